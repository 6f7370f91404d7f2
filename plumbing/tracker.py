"""wandb behind a thin wrapper: offline without an API key (never a login prompt), nothing imported when disabled."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterable, Optional

from plumbing.cliargs import CLIError

# -------------------------------------------------------------------------------------------------- wandb


def wandb_mode(requested: Optional[str]) -> str:
    """The flag if given; otherwise online only when an API key is configured (never a login prompt)."""
    if requested:
        return requested
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = os.path.expanduser("~/.netrc")
    try:
        with open(netrc, encoding="utf-8") as f:
            if "api.wandb.ai" in f.read():
                return "online"
    except OSError:
        pass
    return "offline"


class Tracker:
    """A thin wandb wrapper: does nothing when disabled, imports wandb only when used."""

    def __init__(self, mode: str, run_dir: str, config: Dict[str, Any], project: str,
                 name: str, run_id: Optional[str] = None, log: Optional[logging.Logger] = None) -> None:
        self.run = None
        self.mode = mode
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            if mode == "online":
                raise CLIError("--wandb online needs the wandb package: pip install wandb") from None
            if log:
                log.info("wandb is not installed: tracking disabled")
            self.mode = "disabled"
            return
        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, dir=run_dir, config=config, mode=mode,
                              id=run_id, resume="allow" if run_id else None, reinit="finish_previous")

    @property
    def run_id(self) -> Optional[str]:
        return self.run.id if self.run is not None else None

    def log(self, data: Dict[str, Any], step: Optional[int] = None) -> None:
        if self.run is not None:
            self.run.log(data, step=step)

    def summary(self, data: Dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in data.items():
                self.run.summary[k] = v

    def image(self, path: str):
        return self.wandb.Image(path) if self.run is not None else None

    def table(self, columns, rows):
        return self.wandb.Table(columns=list(columns), data=[list(r) for r in rows]) if self.run is not None else None

    def artifact(self, name: str, kind: str, files: Iterable[str]) -> None:
        if self.run is None:
            return
        art = self.wandb.Artifact(name, type=kind)
        for f in files:
            art.add_file(f)
        self.run.log_artifact(art)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
