"""Loggers of the tools people already use, each one more event sink named in `train.log`.

A logger is a class taking (run folder, the step the run starts from, the run's facts) and
called with every event; `close()` ends it, after the summary. To add one, write its class and
name it in LOGGERS: nothing else changes. MLflow's and W&B's share catalog/tracking.py's
Tracker (one tracked run per run folder, continued by a resume).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mbp_cli import events as ev
from mbp_cli.catalog.tracking import RunFacts, Series, Tracker, first_line, flattened, is_figure
from mbp_cli.errors import UsageError


def required(module: str, package: str, tool: str) -> Any:
    """The module a logger needs, or one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(f"train.log: {tool} needs the {package} package: "
                         f"pip install 'mbp-cli[{tool}]'") from exc


class TensorBoardLog:
    """Scalars for TensorBoard under RUN/tensorboard, as metrics.jsonl has them (its step is
    the optimizer step). A resumed run discards what the first part logged after its
    checkpoint (TensorBoard's purge_step), so no step is there twice."""

    folder = "tensorboard"

    def __init__(self, run_dir: Path, start_step: int, facts: RunFacts | None = None) -> None:
        self._writer_class = required("torch.utils.tensorboard", "tensorboard",
                                      "tensorboard").SummaryWriter
        self.path, self.start_step = run_dir / self.folder, start_step
        self.writer: Any = None
        self.series = Series()
        self.where = f"tensorboard in {self.path}"

    def __call__(self, event: ev.Event) -> None:
        scalars = self.scalars(event)
        if not scalars:
            return
        if self.writer is None:  # the run folder exists once a step has succeeded
            # Steps after the checkpoint are logged again: drop the first part's.
            purge = self.start_step + 1 if self.start_step else None
            self.writer = self._writer_class(str(self.path), purge_step=purge)
        step = event.step
        for name, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def scalars(self, event: ev.Event) -> dict[str, float | None]:
        """The scalars an event gives, by TensorBoard tag."""
        return self.series(event)

    def close(self) -> None:
        """Write out and close the event file."""
        if self.writer is not None:
            self.writer.close()


class MLflowLog(Tracker):
    """One MLflow run per run folder, in the store MLFLOW_TRACKING_URI names (else
    sqlite:///…/mlflow.db beside the run folder, artifacts in mlartifacts/ beside it), in the
    experiment train.experiment (default: the recipe's name): the recipe as params (keys joined
    with dots), the series as metrics, the summary's figures as metrics and the rest as tags
    (summary.*), model.pt and summary.json as artifacts (train.log_artifacts)."""

    tool = "mlflow"

    def check(self) -> None:
        MlflowClient = required("mlflow", "mlflow-skinny", "mlflow").MlflowClient  # noqa: N806
        chosen = os.environ.get("MLFLOW_TRACKING_URI") or self.kept.get("tracking_uri")
        self.is_default_store = not chosen
        beside = self.run_dir.resolve().parent
        if not chosen:
            beside.mkdir(parents=True, exist_ok=True)
        self.uri = chosen or f"sqlite:///{beside / 'mlflow.db'}"
        self.where = f"mlflow at {self.uri}"
        self.artifacts = (beside / "mlartifacts").as_uri()
        self.client, self.run_id = MlflowClient(self.uri), self.kept.get("run_id")
        try:
            with _one_try():
                experiment = self.client.get_experiment_by_name(self.facts.experiment)
        except ImportError as exc:  # a SQL store without SQLAlchemy
            raise UsageError(f"train.log: mlflow's store {self.uri} needs the {exc.name} "
                             "package: pip install 'mbp-cli[mlflow]'") from exc
        except Exception as exc:  # whatever the store says: it cannot be used
            raise UsageError(f"train.log: mlflow's tracking store {self.uri} does not answer "
                             f"({first_line(exc)}); start it, or set MLFLOW_TRACKING_URI to one "
                             "that does") from exc
        if experiment is not None and experiment.lifecycle_stage == "deleted":
            raise UsageError(f"train.log: mlflow's experiment {self.facts.experiment!r} is "
                             f"deleted in {self.uri}: restore it (mlflow experiments restore) or "
                             "name another with train.experiment")
        if self.run_id is not None:
            try:
                self.client.get_run(self.run_id)
            except Exception as exc:
                raise UsageError(f"train.log: mlflow run {self.run_id} of {self.kept_path} is "
                                 f"not in {self.uri} ({first_line(exc)}); set "
                                 "MLFLOW_TRACKING_URI to the store it was logged to") from exc

    def start(self) -> dict[str, Any]:
        from mlflow.entities import Param

        if self.run_id is not None:  # a resume: the same run goes on
            self.client.update_run(self.run_id, status="RUNNING")
            return {key: value for key, value in self.kept.items() if key != "last_steps"}
        name = self.facts.experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else \
            self.client.create_experiment(
                name, artifact_location=self.artifacts if self.is_default_store else None)
        run = self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                     tags={"mbp.run_dir": str(self.run_dir.resolve())})
        self.run_id = run.info.run_id
        params = [Param(key, str(value)[:6000])
                  for key, value in flattened(self.facts.config).items()]
        for first in range(0, len(params), 100):  # MLflow takes 100 params a batch
            self.client.log_batch(self.run_id, params=params[first:first + 100])
        return {"tracking_uri": self.uri, "experiment_id": experiment_id, "run_id": self.run_id}

    def send(self, step: int, figures: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step)
                                                    for key, value in figures.items()])

    def send_summary(self, summary: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        flat = flattened(summary)
        self.send_new(summary.get("steps", 0), {k: v for k, v in flat.items() if is_figure(v)})
        tags = [RunTag(f"summary.{key}", str(value)[:5000]) for key, value in flat.items()
                if value is not None and not is_figure(value)]
        self.client.log_batch(self.run_id, tags=tags)
        if self.facts.log_artifacts:
            for name in ("model.pt", "summary.json"):
                if (self.run_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(self.run_dir / name))

    def end(self) -> None:
        self.client.set_terminated(self.run_id, self.status)


@contextlib.contextmanager
def _one_try() -> Iterator[None]:
    """MLflow's HTTP requests without its retries (minutes of backoff against a server that is
    not there) for the check at the start, where the user has not set them."""
    defaults = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
    added = [key for key in defaults if key not in os.environ]
    os.environ.update({key: defaults[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class WandbLog(Tracker):
    """One W&B run per run folder, online or offline as W&B's settings say (WANDB_MODE, `wandb
    offline`), its files in RUN/wandb (or WANDB_DIR), in the project train.experiment (default:
    the recipe's name): the recipe as its config, the series, the summary."""

    tool = "wandb"

    def check(self) -> None:
        self.wandb = wandb = required("wandb", "wandb", "wandb")
        settings = wandb.setup().settings
        self.mode = settings.mode
        files = Path(os.environ.get("WANDB_DIR") or self.run_dir) / "wandb"
        self.where = f"wandb ({self.mode}) in {files}"
        if self.mode in ("offline", "dryrun", "disabled"):
            return
        try:
            is_logged_in = wandb.login(prompt=False, verify=True)
        except Exception as exc:  # the server refused the key, or did not answer
            raise UsageError(f"train.log: wandb cannot log in to {settings.base_url} "
                             f"({first_line(exc)}); check the key and the network, or set "
                             "WANDB_MODE=offline to log here (wandb sync uploads it later)"
                             ) from exc
        if not is_logged_in:
            raise UsageError("train.log: wandb is online and not logged in: run `wandb login` "
                             "(or set WANDB_API_KEY), or set WANDB_MODE=offline to log here")

    def start(self) -> dict[str, Any]:
        wandb = self.wandb
        project = re.sub(r"[/\\#?%:]", "-", self.facts.experiment)[:128]
        self.run = wandb.init(  # a resume continues the kept id's run
            project=project, name=self.run_dir.name, id=self.kept.get("id"),
            resume="allow" if self.kept else None,
            dir=None if os.environ.get("WANDB_DIR") else str(self.run_dir),
            config=None if self.kept else self.facts.config, reinit="create_new",
            settings=wandb.Settings(console="off", quiet=True))
        if self.kept:  # a resume's safe changes (train.steps, …) replace their values
            self.run.config.update(self.facts.config, allow_val_change=True)
        return {"id": self.run.id, "project": project, "mode": self.mode,
                "files": str(Path(self.run.dir).resolve().parent)}

    def send(self, step: int, figures: dict[str, float]) -> None:
        self.run.log(figures, step=step)

    def send_summary(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(summary)

    def end(self) -> None:
        codes = {"FINISHED": 0, "FAILED": 1, "KILLED": 130 if self.signal == "SIGINT" else 143}
        self.run.finish(exit_code=codes[self.status])


LOGGERS = {"tensorboard": TensorBoardLog, "mlflow": MLflowLog, "wandb": WandbLog}
