"""Gradio's per-session state, made cheap to start.

Gradio (6.x) keeps a `SessionState` per session hash: one per browser tab, one per
`gradio_client.Client`, and one per plain-HTTP call (`POST /gradio_api/call/<name>` carries no
session hash, so each such call starts a session of its own). Creating one computes the
configuration of every block of the page up front, for deep links: for this page (about a thousand
blocks: the schema forms) that is about 0.1 s of the server's event loop, during which no other
request moves. Fifty plain-HTTP calls at once therefore answered together after 5 s on an idle
machine, and after 30 s and more while a job shared the cores.

`LazySessionState` computes a block's configuration only when something asks for it: an update of
that block during an event (as Gradio does anyway), or the full list for a deep link (the app
offers none, but the route exists). `use_lazy_sessions(app)` makes a launched app create these;
`launch_app` calls it from the app's startup, before the first request is served.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import asynccontextmanager
from typing import Any

from gradio.state_holder import SessionState, StateHolder


class _ConfigOnly:
    """The part of a `gr.Blocks` that `SessionState.__init__` needs, with no blocks to configure
    up front (it computes the configuration of the blocks it is given)."""

    def __init__(self, blocks):
        self.default_config = blocks.default_config
        self.blocks: dict[int, Any] = {}


class LazySessionState(SessionState):
    """A `SessionState` whose block configurations are computed when first needed."""

    def __init__(self, blocks):
        super().__init__(_ConfigOnly(blocks))
        self._page_blocks = blocks.blocks

    @property
    def components(self) -> Iterator[dict]:
        """Every block's configuration (as Gradio's deep-link route reads it), computed now for
        the blocks no event has configured yet."""
        for key, block in self.blocks_config.blocks.items():
            if key in self._page_blocks and key not in self.config_values:
                self.config_values[key] = self.blocks_config.config_for_block(key, [], block)
        return super().components


class LazyStateHolder(StateHolder):
    """Gradio's session store, creating `LazySessionState`s."""

    def __getitem__(self, session_id: str) -> SessionState:
        if session_id not in self.session_data:
            self.session_data[session_id] = LazySessionState(self.blocks)
        return super().__getitem__(session_id)


def use_lazy_sessions(app) -> None:
    """Give a Gradio server app (`gradio.routes.App`) a `LazyStateHolder` for its Blocks; sessions
    it already holds are kept."""
    holder = LazyStateHolder()
    holder.set_blocks(app.get_blocks())
    holder.session_data.update(app.state_holder.session_data)
    holder.time_last_used.update(app.state_holder.time_last_used)
    app.state_holder = holder


@asynccontextmanager
async def lazy_sessions_lifespan(app):
    """A FastAPI lifespan (Gradio's `launch(app_kwargs={"lifespan": ...})`): installs the lazy
    session store when the server starts, before it serves a request."""
    use_lazy_sessions(app)
    yield
