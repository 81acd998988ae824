"""Adapter methods, one module per method, each the `workbench.methods.AdapterMethod` interface:
its recipe section, attach / train / save / load, the detection of its saved folder and its task
vector. The package's entry points (pyproject.toml) register them in `workbench.methods`."""
