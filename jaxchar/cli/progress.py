"""What `jaxchar train` shows while it runs, and how it stops on a signal."""

from __future__ import annotations

import os
import signal
import sys

from jaxchar.cli.common import EXIT_INTERRUPTED, info


class StopFlag:
    """SIGINT/SIGTERM: the first asks the loop to save and stop; a second exits at once
    (orbax writes each checkpoint to a temporary folder and renames it, so nothing saved
    is damaged by leaving mid-write)."""

    def __init__(self) -> None:
        self.stop = False

    def __call__(self, signum, frame) -> None:
        if self.stop:
            os._exit(EXIT_INTERRUPTED)
        self.stop = True
        info("jaxchar: stopping: saving a checkpoint first (press Ctrl-C again to quit at once)")

    def install(self) -> None:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)


class Progress:
    """The training events on stderr: a tqdm bar on a terminal, plain periodic lines
    otherwise; saves, samples and notes as lines."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.tty = quiet, None, sys.stderr.isatty()

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            info(text)

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if self.quiet:
            return
        if kind in ("corpus", "backend", "sized", "time_up", "samples"):
            self.line(event["text"])
        elif kind == "note":
            self.line(f"note: {event['text']}")
        elif kind == "start":
            if self.tty:
                from tqdm import tqdm

                self.bar = tqdm(total=event["total_steps"], initial=event["step"], unit="step")
            what = "resuming at" if event["step"] else "training from"
            self.line(
                f"{what} step {event['step']} of {event['total_steps']} "
                f"({event['steps_per_epoch']} steps per epoch)"
            )
        elif kind == "progress":
            speed = f"{event['chars_per_s']:,.0f} chars/s"
            if self.bar is not None:
                self.bar.n = event["step"]
                self.bar.set_postfix_str(f"loss {event['loss']:.4f}, {speed}")
            else:
                info(
                    f"epoch {event['epoch']} step {event['step']}/{event['total_steps']} "
                    f"loss {event['loss']:.4f} nats/char {speed}"
                )
        elif kind == "save":
            text = (
                f"saved step {event['step']} (epoch {event['epoch']}): train loss "
                f"{event['train_loss']:.4f} nats/char ({event['train_bpc']:.3f} bits/char)"
            )
            if "val_loss" in event:
                text += f", val loss {event['val_loss']:.4f} ({event['val_bpc']:.3f} bits/char)"
                scored, whole = event["val_chars"], event["val_text_chars"]
                if scored < 0.95 * whole:  # train.eval_batches: say which part it measured
                    text += f" on the first {scored:,} of {whole:,} held-out characters"
            if event.get("interrupted"):
                text += " (mid-epoch, for resuming: validation runs at the next regular save)"
            self.line(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
