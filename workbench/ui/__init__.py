"""The browser UI (Gradio): `python app.py` or `workbench app`.

Plain Python, no Gradio: `forms` (recipe forms from the schema), `paths` (the workspace boundary),
`service` (the app's actions), `compare` (gain vs forgetting across runs), `playground`
(side-by-side generation in its own worker process). Exports are the `workbench export` stage
(`workbench.exporting`), queued as jobs.
Gradio: `widgets` (forms as components, the merge editors), `app` (the page and its API), `tabs`
(Evaluate & compare, Playground, Export); `launch` starts it safely.
"""
