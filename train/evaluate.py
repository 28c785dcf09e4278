"""`python -m train.evaluate ckpt=PATH out=DIR [split=val]`: a checkpoint's report on one split.

Every sample of the split is predicted once, on any number of ranks (the data layer's eval plan
gives each sample to exactly one rank), and the gathered predictions make:

    out/metrics.json      the task's metrics (classify: top-1, top-5, macro F1, per-class
                          precision/recall, confusion; multilabel: per-label AP/F1/threshold,
                          exact-set accuracy; segment: per-class IoU/Dice, defect-pixel IoU,
                          pixel confusion; anomaly: image AUROC/AP, F1-max, pixel AUROC,
                          AUPRO, raw scores, calibration), bad samples, and the defect decision
                          (a split of good parts only: anomaly's false-alarm rule)
    out/predictions.csv   one row per sample: key, truth, prediction, defect score, probabilities
    out/confusion.png     out/mistakes.png (worst parts; segment: image, true and predicted mask)
    out/defect.png        ROC and precision-recall of the part's defect score
    out/model.ckpt        the model with its decision threshold, for predict and export

A data set with no good class (no `good`, `ok` or `pass`; digits, say) gets every metric but
the decision, with a note.

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
from omegaconf import DictConfig, OmegaConf, open_dict

from data import memory
from data.errors import UserError
from train import decision as defect
from train import settings, tasks
from train.checkpoint import KEY, file_sha256, load_checkpoint, model_from_checkpoint, save_model, trained_on
from train.cli import CONFIG_PATH, run_cli
from train.collect import Predictions
from train.network import ModelSpec
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
    memory.for_model_on(OmegaConf.select(cfg, "trainer.accelerator"))
    out = check_out(cfg.out, cfg.overwrite, "metrics.json", inputs=(cfg.ckpt,))
    ckpt = load_checkpoint(cfg.ckpt)
    meta = ckpt[KEY]
    net = model_from_checkpoint(ckpt)
    spec = net.spec
    task = tasks.of(spec)
    given = (
        {"index": cfg.data.index} if cfg.data.index else {"mix": cfg.data.mix} if cfg.data.get("mix") else {}
    )
    data = given or trained_on(meta)
    index = data.get("index") or "the mix " + ", ".join(str(e["index"]) for e in data["mix"])
    datamodule = instantiate(
        cfg.data,
        index=data.get("index"),
        mix=data.get("mix"),
        image_size=spec.image_size,
        crop_pct=spec.crop_pct,
        val_split=cfg.split,
        synthetic=None,
        audit=False,
        target=task.target,
        eval_fit=task.eval_fit,
        tiles=spec.tiles or None,  # a model trained on tiles judges whole parts, tiled as it was trained
    )
    if datamodule.classes != spec.classes:
        raise UserError(
            f"data set {index} has classes {list(datamodule.classes)}, the checkpoint "
            f"{list(spec.classes)}: evaluate on a data set with the same classes in the same order"
        )
    expected = datamodule.index.split(cfg.split).num_samples
    chosen, note = _decision_inputs(cfg.defect, spec)  # checked before the pass, not after it
    defects = [spec.classes.index(c) for c in chosen[1]] if chosen else []
    module = Predictions(net, task, defects, cfg.gallery)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    r = module.gathered()  # every rank takes part, also one that had no batch
    if not trainer.is_global_zero:
        return None  # rank zero writes the report

    bad = sum(r["bad"].values())
    _check_counts(r["keys"], bad, expected, cfg)
    calibration = None
    if hasattr(task, "calibrate"):  # anomaly: raw scores → defect scores in [0, 1]
        spec, calibration = task.calibrate(r, spec)
    report = {
        "checkpoint": os.path.abspath(cfg.ckpt),
        "dataset": {
            "index": datamodule.index.location,
            "sha256": datamodule.index.sha256,
            "split": cfg.split,
        },
        "split_samples": expected,
        "bad_samples": {"count": bad, "reasons": dict(r["bad"])},
        "task": task.name,
        **task.report(r, spec),
        **({"calibration": calibration} if calibration else {}),
    }
    decision, curves, scores = None, None, None
    if chosen:
        scores = r["defect_scores"] if "defect_scores" in r else task.defect_scores(r["probs"], spec, defects)
        report["defect"], decision, curves = _decide(chosen, r, scores, task.name == "anomaly")
        if decision and hasattr(task, "label_thresholds"):  # multi-label: each label's own too
            labels = task.label_thresholds(r, spec, chosen[2])
            decision = replace(decision, labels=labels)
            report["defect"]["label_thresholds"] = labels
    else:
        report["defect"] = {"skipped": note}
        log.warning("%s", note)

    if scores is None and "defect_scores" in r:
        scores = r["defect_scores"]
    if decision and "in_truth" in r:  # segment, anomaly: does the stopped part's region meet the defect?
        report["localisation"] = localisation(r["is_defect"], scores, r["in_truth"], decision.threshold)
    if decision:  # what model.ckpt carries, and what predictions.csv's decisions follow
        spec = replace(spec, extra={**spec.extra, "decision": decision.to_dict()})
    with published(out) as tmp:
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(report, f, indent=2)
        threshold = decision.threshold if decision else None
        write_predictions(os.path.join(tmp, "predictions.csv"), task.rows(r, spec, scores, threshold))
        from train import plots

        if "confusion" in report:
            plots.confusion_png(report["confusion"], spec.classes, os.path.join(tmp, "confusion.png"))
        plots.gallery_png(r["gallery"], os.path.join(tmp, "mistakes.png"))
        if decision and curves:
            plots.defect_png(curves, report["defect"], os.path.join(tmp, "defect.png"))
        if decision:
            net.spec = spec
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


def localisation(is_defect: np.ndarray, scores: np.ndarray, in_truth: np.ndarray, threshold: float) -> dict:
    """Of the defective parts caught (score >= threshold) whose defect has a known place, how many
    the model stops for the right place: its predicted defect region (the pixels whose defect
    score reaches the threshold) overlaps the true one, i.e. the strongest score inside the true
    region (`in_truth`, NaN where unknown) reaches the threshold."""
    known = is_defect & ~np.isnan(in_truth)
    caught = known & (scores >= threshold)
    localised = caught & (np.nan_to_num(in_truth, nan=-1.0) >= threshold)
    return {
        "caught": int(caught.sum()),
        "localised": int(localised.sum()),
        "localised_share": float(localised.sum() / caught.sum()) if caught.any() else None,
        "rule": "a caught part is localised when its predicted defect region (score >= the threshold) "
        "overlaps its true defect region",
    }


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


def _decision_inputs(d: DictConfig | None, spec: ModelSpec) -> tuple[tuple | None, str]:
    """((good, defect classes, target escape, threshold or None to choose one, how it was set,
    target false alarm), or None with a note of why there is no decision to make)."""
    if not d or d.good is None:
        return None, "defect.good=null: no defect decision asked for"
    good = d.good
    if good == "auto":  # the model's own, else found by name: good, ok or pass
        good = spec.good or defect.find_good(spec.classes)
        if good is None:
            return None, (
                f"no good class among {list(spec.classes)} (none is named good, ok or pass): every metric "
                "but the defect decision is reported; name the class of parts that pass with defect.good=NAME"
            )
    classes = defect.defect_classes(spec.classes, good, d.classes)
    target = float(d.target_escape)  # in (0, 1): train/settings.py
    false_alarm = float(d.get("target_false_alarm", 0.01))
    stored = spec.extra.get("decision")
    if d.threshold in (None, "auto"):
        # A model.ckpt evaluated again (on a held-out split, say) is judged by its own threshold.
        if stored and (stored["good"], tuple(stored["defect_classes"])) == (good, classes):
            return (
                good,
                classes,
                target,
                float(stored["threshold"]),
                "stored with the model",
                false_alarm,
            ), ""
        return (good, classes, target, None, "target_escape", false_alarm), ""
    if d.threshold == "choose":
        return (good, classes, target, None, "target_escape", false_alarm), ""
    return (good, classes, target, float(d.threshold), "given threshold", false_alarm), ""


def _decide(chosen: tuple, r: dict, scores: np.ndarray, good_only_rule: bool = False) -> tuple:
    """The defect section of the report, the Decision it chose, and the curves to draw (None
    for a split of good parts only), or a note of why there is none (a split without defect or
    without good samples). `good_only_rule`: a split of good parts only sets the threshold by
    the target false-alarm rate (the anomaly task's validation) rather than going without."""
    good, defects, target, threshold, how, false_alarm = chosen
    is_defect = r["is_defect"]
    section = {"good": good, "defect_classes": list(defects)}
    if good_only_rule and is_defect.size and not is_defect.any():
        section |= defect.false_alarm_report(scores, false_alarm, threshold, how)
        return section, defect.Decision(good, defects, section["threshold"]), None
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
    keep = (
        "threshold",
        "target_escape",
        "escape_rate",
        "escape_rate_upper95",
        "target_false_alarm",
        "false_alarm_rate",
    )
    headline = (
        "top1",
        "macro_f1",
        "macro_ap",
        "exact_set_accuracy",
        "defect_iou",
        "miou",
        "image_auroc",
        "pixel_auroc",
    )
    return {
        "source_checkpoint": {"path": os.path.abspath(ckpt_path), "sha256": file_sha256(ckpt_path)},
        "dataset": report["dataset"],
        "samples": report["samples"],
        **{k: report[k] for k in headline if k in report},
        "defect": {k: report["defect"][k] for k in keep if k in report["defect"]},
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
