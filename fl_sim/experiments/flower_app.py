"""The Flower ServerApp of ``flwr run .`` (pyproject's ``[tool.flwr.app.components]``).

``app`` parses Flower's ``context.run_config`` once into a ``RunConfig`` and runs its experiment:
one run (``experiment = "single"``) or the compare experiment (every rule, one-shot and
multi-round, fl_sim/experiments/compare.py), through ``run_federations``
(fl_sim/federation/server_app.py: ``concurrent-runs`` at once), then the compare table and plots.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_sim.config.run_config import RunConfig
from fl_sim.experiments.compare import expand_experiment, write_experiment
from fl_sim.federation.server_app import RoundCallback, run_federations


def make_server_app(
    run_config: RunConfig | None = None, *, on_round: RoundCallback | None = None
) -> ServerApp:
    """A ServerApp for ``run_config`` (None: parse Flower's ``context.run_config``, as under
    ``flwr run``); a compare experiment runs all its runs, then writes its table and plots."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = run_config or RunConfig.from_mapping(dict(context.run_config))
        results = run_federations(grid, expand_experiment(config), on_round=on_round)
        if config.experiment.kind == "compare":
            write_experiment(config, results)

    return app


app = make_server_app()
