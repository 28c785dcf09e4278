"""`python -m train.evaluate ckpt=PATH out=DIR [split=val]`: a checkpoint's report on one split.

Every sample of the split is predicted once, on any number of ranks (the data layer's eval plan
gives each sample to exactly one rank), and the gathered predictions make:

    out/metrics.json      top-1, top-5 (over 5 classes), macro F1, per-class precision/recall/
                          support, confusion matrix, bad samples, and the defect decision
    out/predictions.csv   one row per sample: key, true and predicted class, probabilities
    out/confusion.png     out/mistakes.png (most confident mistakes)    out/defect.png (ROC, PR)
    out/model.ckpt        the model with its decision threshold, for predict and export

The report is logged to the chosen tracker (logger=mlflow, wandb, ...) as a run of its own.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace

import hydra
import lightning.pytorch as L
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from data.errors import UserError
from train import decision as defect
from train import settings
from train.checkpoint import KEY, file_sha256, load_checkpoint, model_from_checkpoint, save_model
from train.classifier import ModelSpec
from train.cli import CONFIG_PATH, run_cli
from train.collect import Predictions
from train.metrics import classification_report
from train.outputs import check_out, published
from train.report import flat_metrics, print_evaluation, write_predictions

log = logging.getLogger("train")


def evaluate(cfg: DictConfig) -> dict | None:
    """Write the report to `cfg.out` and return metrics.json's content (None on ranks > 0)."""
    if not cfg.ckpt:
        raise UserError(
            "ckpt is not set: give the checkpoint to evaluate (ckpt=outputs/NAME/.../epoch009.ckpt)"
        )
    settings.check(cfg, "evaluate")
    out = check_out(cfg.out, cfg.overwrite, "metrics.json", inputs=(cfg.ckpt,))
    ckpt = load_checkpoint(cfg.ckpt)
    meta = ckpt[KEY]
    net = model_from_checkpoint(ckpt)
    spec = net.spec
    index = cfg.data.index or meta["lineage"]["dataset"]["index"]
    datamodule = instantiate(
        cfg.data,
        index=index,
        image_size=spec.image_size,
        crop_pct=spec.crop_pct,
        val_split=cfg.split,
        synthetic=None,
        audit=False,
    )
    if datamodule.classes != spec.classes:
        raise UserError(
            f"data set {index} has classes {list(datamodule.classes)}, the checkpoint "
            f"{list(spec.classes)}: evaluate on a data set with the same classes in the same order"
        )
    expected = datamodule.index.split(cfg.split).num_samples
    chosen = _decision_inputs(cfg.defect, spec)  # checked before the pass, not after it
    module = Predictions(net, cfg.gallery)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    r = module.gathered()  # every rank takes part, also one that had no batch
    if not trainer.is_global_zero:
        return None  # rank zero writes the report

    bad = sum(r["bad"].values())
    _check_counts(r["keys"], bad, expected, cfg)
    report = {
        "checkpoint": os.path.abspath(cfg.ckpt),
        "dataset": {
            "index": datamodule.index.location,
            "sha256": datamodule.index.sha256,
            "split": cfg.split,
        },
        "split_samples": expected,
        "bad_samples": {"count": bad, "reasons": dict(r["bad"])},
        **classification_report(r["labels"], r["probs"], spec.classes),
    }
    decision, curves = None, None
    if chosen:
        report["defect"], decision, curves = _decide(chosen, r, spec)

    with published(out) as tmp:
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(report, f, indent=2)
        write_predictions(os.path.join(tmp, "predictions.csv"), r, spec.classes, decision)
        from train import plots

        plots.confusion_png(report["confusion"], spec.classes, os.path.join(tmp, "confusion.png"))
        plots.gallery_png(r["mistakes"], spec.classes, os.path.join(tmp, "mistakes.png"))
        if decision:
            plots.defect_png(curves, report["defect"], os.path.join(tmp, "defect.png"))
            net.spec = replace(spec, extra={**spec.extra, "decision": decision.to_dict()})
            save_model(
                os.path.join(tmp, "model.ckpt"), net, {**meta, "evaluation": _summary(report, cfg.ckpt)}
            )
        try:
            # Trackers write their local files (wandb offline, csv) into the report too, so they
            # are logged before it is published. Any failure there (a server down) must not cost
            # the report itself: it is published, then the failure is reported.
            _log_to_trackers(cfg, report, tmp, meta["lineage"]["config"].get("name"), meta.get("run_ids", {}))
            tracker_error = None
        except Exception as e:
            tracker_error = e
    print_evaluation(report, out)
    if tracker_error:
        raise UserError(
            f"the report is written to {out}, but logging it to the tracker failed: {tracker_error}"
        )
    return report


def _check_counts(keys: list[str], bad: int, expected: int, cfg: DictConfig) -> None:
    """Every sample of the split exactly once: predicted, or skipped as bad."""
    if len(set(keys)) != len(keys):
        raise UserError(
            f"split {cfg.split} holds {len(keys) - len(set(keys))} duplicate keys: a report by key would "
            "mix samples up (check the shards with python -m data verify)"
        )
    if len(keys) + bad != expected and cfg.trainer.get("limit_val_batches") is None:
        raise UserError(
            f"evaluated {len(keys)} samples and skipped {bad} bad ones, but split {cfg.split} lists "
            f"{expected} in its index: the shards and dataset.json disagree (python -m data verify)"
        )


def _decision_inputs(d: DictConfig | None, spec: ModelSpec) -> tuple | None:
    """(good, defect classes, target escape, threshold or None to choose one, how it was set)."""
    if not d or d.good is None:
        return None
    classes = defect.defect_classes(spec.classes, d.good, d.classes)
    target = float(d.target_escape)  # in (0, 1): train/settings.py
    stored = spec.extra.get("decision")
    if d.threshold in (None, "auto"):
        # A model.ckpt evaluated again (on a held-out split, say) is judged by its own threshold.
        if stored and (stored["good"], tuple(stored["defect_classes"])) == (d.good, classes):
            return d.good, classes, target, float(stored["threshold"]), "stored with the model"
        return d.good, classes, target, None, "target_escape"
    if d.threshold == "choose":
        return d.good, classes, target, None, "target_escape"
    return d.good, classes, target, float(d.threshold), "given threshold"


def _decide(chosen: tuple, r: dict, spec: ModelSpec) -> tuple:
    """The defect section of the report, the Decision it chose, and the curves to draw, or a
    note of why there is none (a split without defect or without good samples)."""
    good, defects, target, threshold, how = chosen
    scores = defect.Decision(good, defects, 0.0).scores(r["probs"], spec.classes)
    is_defect = np.isin(r["labels"], [spec.classes.index(c) for c in defects])
    section = {"good": good, "defect_classes": list(defects)}
    if is_defect.all() or not is_defect.any():
        missing = "good" if is_defect.all() else "defect"
        note = f"split has no {missing} samples: no threshold chosen, and no model.ckpt written"
        log.warning("%s", note)
        return {**section, "skipped": note}, None, None
    section |= defect.report(scores[is_defect], scores[~is_defect], target, threshold, how)
    curves = defect.curves(scores[is_defect], scores[~is_defect])
    return section, defect.Decision(good, defects, section["threshold"]), curves


def _summary(report: dict, ckpt_path: str) -> dict:
    """What model.ckpt records of the evaluation that set its threshold."""
    keep = ("threshold", "target_escape", "escape_rate", "escape_rate_upper95", "false_alarm_rate")
    return {
        "source_checkpoint": {"path": os.path.abspath(ckpt_path), "sha256": file_sha256(ckpt_path)},
        "dataset": report["dataset"],
        "samples": report["samples"],
        "top1": report["top1"],
        "macro_f1": report["macro_f1"],
        "defect": {k: report["defect"][k] for k in keep},
    }


def _log_to_trackers(
    cfg: DictConfig, report: dict, out: str, trained_name: str | None, run_ids: dict
) -> None:
    if not cfg.get("logger"):
        return
    from train.tracking import build_loggers, log_report

    with open_dict(cfg):
        cfg.name = cfg.name or trained_name or "evaluate"
        cfg.paths.output_dir = out
    loggers = build_loggers(cfg.logger, {}, run_name=f"evaluate-{cfg.split}")
    files = [os.path.join(out, f) for f in sorted(os.listdir(out)) if f.endswith((".json", ".png", ".csv"))]
    tags = {"shardtrain.evaluates": run_ids.get("mlflow") or run_ids.get("wandb") or "", "split": cfg.split}
    log_report(loggers, flat_metrics(report), files, tags)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_cli(evaluate, cfg)


if __name__ == "__main__":
    main()
