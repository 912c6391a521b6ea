"""Does dvclive's Lightning logger survive a resumed run? (issue 13: "if it survives resume ... correctly").

Needs ``pip install dvclive==3.49.1`` (not a project dependency: the answer was no). Run in an empty directory that is
a git repository with one commit (dvclive refuses an empty repository)::

    python resume_check.py first    # 10-step fit, checkpoint at step 6, killed after step 8
    python resume_check.py resume   # resumes the step-6 checkpoint with DVCLiveLogger(resume=True)

then read ``live/plots/metrics/train/loss.tsv`` after each: which steps are there, and how often. With
``resume=False`` (the default) the second invocation starts the files afresh (the first invocation's steps are
gone). Results: experiments/LOG.md, 2026-11-26.
"""

import sys

import lightning as L
from dvclive.lightning import DVCLiveLogger
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel


class Model(BoringModel):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train/loss", out["loss"], on_step=True, on_epoch=False)
        return out


class Kill(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 8:
            raise KeyboardInterrupt  # killed after step 8; the checkpoint of step 6 is on disk


def main(mode: str) -> None:
    resume = mode == "resume"
    L.seed_everything(0)
    logger = DVCLiveLogger(dir="live", resume=resume, save_dvc_exp=False)
    callbacks = [ModelCheckpoint(dirpath="ck", every_n_train_steps=6, save_top_k=-1)]
    if not resume:
        callbacks.append(Kill())
    trainer = L.Trainer(max_steps=10, logger=logger, callbacks=callbacks, log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    try:
        trainer.fit(Model(), ckpt_path="ck/epoch=0-step=6.ckpt" if resume else None)
    except (KeyboardInterrupt, SystemExit):  # Lightning turns the interrupt into SystemExit
        pass
    with open("live/plots/metrics/train/loss.tsv") as f:
        steps = [line.split("\t")[0] for line in f.read().splitlines()[1:]]
    print(f"[{mode}] steps in loss.tsv: {steps}")


if __name__ == "__main__":
    main(sys.argv[1])
