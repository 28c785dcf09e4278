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

import csv
import hashlib
import json
import logging
import os
from collections import Counter

import hydra
import lightning.pytorch as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from data.errors import UserError
from train import decision as defect
from train.checkpoint import KEY, load_checkpoint, model_from_checkpoint, save_model
from train.classifier import Classifier, ModelSpec
from train.cli import CONFIG_PATH, run_cli
from train.metrics import classification_report
from train.outputs import check_out, published

log = logging.getLogger("train")


class Predictions(L.LightningModule):
    """Predicts the eval plan's samples; after the pass, rank zero holds every rank's keys,
    labels and probabilities, and the `gallery` most confident mistakes with their pixels."""

    def __init__(self, net: Classifier, gallery: int):
        super().__init__()
        self.net, self.gallery = net, gallery
        self.keys: list[str] = []
        self.labels: list[np.ndarray] = []
        self.probs: list[np.ndarray] = []
        self.mistakes: list[dict] = []
        self.bad: Counter = Counter()
        self.result: dict | None = None

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        images, labels, keys = batch[0], batch[1], batch[2]  # uint8 (B, 3, S, S), (B,), B keys
        if len(batch) > 3:
            self.bad.update(batch[3]["reasons"])
        probs = self.net(images).float().softmax(dim=1)  # (B, C)
        confidence, predicted = probs.max(dim=1)
        self.keys += keys
        self.labels.append(labels.cpu().numpy())
        self.probs.append(probs.cpu().numpy())
        for i in torch.nonzero(predicted != labels).flatten().tolist():
            self.mistakes.append(
                {
                    "key": keys[i],
                    "label": int(labels[i]),
                    "predicted": int(predicted[i]),
                    "confidence": float(confidence[i]),
                    "image": images[i].cpu().clone(),  # the batch lives in reused shared memory
                }
            )
        self.mistakes = _most_confident(self.mistakes, self.gallery)

    def on_validation_epoch_end(self) -> None:
        c = len(self.net.spec.classes)
        part = {
            "keys": self.keys,
            "labels": np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64),
            "probs": np.concatenate(self.probs) if self.probs else np.zeros((0, c), np.float32),
            "mistakes": self.mistakes,
            "bad": self.bad,
        }
        parts = [part]
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            parts = [None] * self.trainer.world_size  # strings and counters travel as objects
            torch.distributed.all_gather_object(parts, part)
        if self.trainer.is_global_zero:
            keys = [k for p in parts for k in p["keys"]]
            order = np.argsort(np.array(keys, dtype=object), kind="stable")  # the same for any world size
            self.result = {
                "keys": [keys[i] for i in order],
                "labels": np.concatenate([p["labels"] for p in parts])[order],
                "probs": np.concatenate([p["probs"] for p in parts])[order],
                "mistakes": _most_confident([m for p in parts for m in p["mistakes"]], self.gallery),
                "bad": sum((p["bad"] for p in parts), Counter()),
            }


def _most_confident(mistakes: list[dict], n: int) -> list[dict]:
    return sorted(mistakes, key=lambda m: (-m["confidence"], m["key"]))[:n]


def evaluate(cfg: DictConfig) -> dict | None:
    """Write the report to `cfg.out` and return metrics.json's content (None on ranks > 0)."""
    if not cfg.ckpt:
        raise UserError(
            "ckpt is not set: give the checkpoint to evaluate (ckpt=outputs/NAME/.../epoch009.ckpt)"
        )
    out = check_out(cfg.out, cfg.overwrite)
    ckpt = load_checkpoint(cfg.ckpt)
    meta = ckpt[KEY]
    net = model_from_checkpoint(ckpt)
    spec = net.spec
    trained = meta["lineage"]["config"]
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
    chosen = _decision_inputs(cfg, spec)  # checked before the pass, not after it
    module = Predictions(net, cfg.gallery)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    if module.result is None:
        return None  # ranks > 0: rank zero writes the report

    r = module.result
    expected = datamodule.index.split(cfg.split).num_samples
    bad = sum(r["bad"].values())
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
    if len(r["keys"]) + bad != expected:
        log.warning(
            "evaluated %d samples and skipped %d bad ones, but split %s has %d (trainer.limit_val_batches?)",
            len(r["keys"]),
            bad,
            cfg.split,
            expected,
        )
    decision = None
    if chosen:
        good, defects, target = chosen
        d = defect.Decision(good, defects, 0.0)
        scores = d.scores(r["probs"], spec.classes)
        is_defect = np.isin(r["labels"], [spec.classes.index(c) for c in defects])
        report["defect"] = {
            "good": good,
            "defect_classes": list(defects),
            **defect.report(scores[is_defect], scores[~is_defect], target, cfg.defect.threshold),
        }
        decision = defect.Decision(good, defects, report["defect"]["threshold"])
        curves = defect.curves(scores[is_defect], scores[~is_defect])

    with published(out) as tmp:
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(report, f, indent=2)
        _write_predictions(os.path.join(tmp, "predictions.csv"), r, spec, decision)
        from train import plots

        plots.confusion_png(report["confusion"], spec.classes, os.path.join(tmp, "confusion.png"))
        plots.gallery_png(r["mistakes"], spec.classes, os.path.join(tmp, "mistakes.png"))
        if decision:
            plots.defect_png(curves, report["defect"], os.path.join(tmp, "defect.png"))
            evaluated = ModelSpec.from_dict(
                {**spec.to_dict(), "extra": {**spec.extra, "decision": decision.to_dict()}}
            )
            net.spec = evaluated
            save_model(
                os.path.join(tmp, "model.ckpt"),
                net,
                {**meta, "evaluation": _summary(report, cfg.ckpt)},
            )
    _print(report, out)
    _log_to_trackers(cfg, report, out, trained.get("name"), meta.get("run_ids", {}))
    return report


def _decision_inputs(cfg: DictConfig, spec: ModelSpec) -> tuple[str, tuple[str, ...], float] | None:
    d = cfg.defect
    if not d or d.good is None:
        return None
    if d.good not in spec.classes:
        raise UserError(
            f"defect.good={d.good}: not a class of this model ({list(spec.classes)}); set defect.good to "
            "the class of parts that pass, or defect.good=null for no defect decision"
        )
    classes = defect.defect_classes(spec.classes, d.good, d.classes)
    if not 0 <= d.target_escape < 1:
        raise UserError(f"defect.target_escape={d.target_escape}: expected a rate in [0, 1), e.g. 0.005")
    return d.good, classes, float(d.target_escape)


def _write_predictions(path: str, r: dict, spec: ModelSpec, decision: defect.Decision | None) -> None:
    predicted = r["probs"].argmax(axis=1)
    scores = decision.scores(r["probs"], spec.classes) if decision else None
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["key", "label", "predicted", "confidence"]
            + (["defect_score", "defect"] if decision else [])
            + [f"p_{c}" for c in spec.classes]
        )
        for i, key in enumerate(r["keys"]):
            p = r["probs"][i]
            row = [key, spec.classes[r["labels"][i]], spec.classes[predicted[i]], f"{p[predicted[i]]:.6f}"]
            if decision:
                row += [f"{scores[i]:.6f}", int(scores[i] >= decision.threshold)]
            w.writerow(row + [f"{v:.6f}" for v in p])


def _summary(report: dict, ckpt_path: str) -> dict:
    """What model.ckpt records of the evaluation that set its threshold."""
    with open(ckpt_path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    keep = (
        "threshold",
        "target_escape",
        "escape_rate",
        "escape_rate_upper95",
        "false_alarm_rate",
        "defect_samples",
    )
    return {
        "source_checkpoint": {"path": os.path.abspath(ckpt_path), "sha256": digest},
        "dataset": report["dataset"],
        "samples": report["samples"],
        "top1": report["top1"],
        "macro_f1": report["macro_f1"],
        "defect": {k: report["defect"][k] for k in keep},
    }


def _print(report: dict, out: str) -> None:
    bad = report["bad_samples"]["count"]
    log.info(
        "evaluated %d samples of split %s%s: top-1 %.4f, macro F1 %.4f",
        report["samples"],
        report["dataset"]["split"],
        f" ({bad} bad, skipped)" if bad else "",
        report["top1"],
        report["macro_f1"],
    )
    d = report.get("defect")
    if d:
        log.info(
            "defect threshold %.4f: escape rate %.2f%% (%d of %d defects; target %.2f%%, 95%% bound %.2f%%), "
            "false alarms %.2f%% (%d of %d good)",
            d["threshold"],
            100 * d["escape_rate"],
            d["escapes"],
            d["defect_samples"],
            100 * d["target_escape"],
            100 * d["escape_rate_upper95"],
            100 * d["false_alarm_rate"],
            d["false_alarms"],
            d["good_samples"],
        )
        for note in d["notes"]:
            log.warning("%s", note)
    log.info("report written to %s", out)


def _log_to_trackers(
    cfg: DictConfig, report: dict, out: str, trained_name: str | None, run_ids: dict
) -> None:
    if not cfg.get("logger"):
        return
    from train.tracking import build_loggers, log_report

    with open_dict(cfg):
        cfg.name = cfg.name or trained_name or "evaluate"
    loggers = build_loggers(cfg.logger, {}, run_name=f"evaluate-{cfg.split}")
    files = [os.path.join(out, f) for f in sorted(os.listdir(out)) if not f.endswith(".ckpt")]
    tags = {"shardtrain.evaluates": run_ids.get("mlflow") or run_ids.get("wandb") or "", "split": cfg.split}
    log_report(loggers, _flat(report), files, tags)


def _flat(report: dict) -> dict[str, float]:
    prefix = f"eval/{report['dataset']['split']}"
    metrics = {f"{prefix}/{k}": report[k] for k in ("top1", "top5", "macro_f1") if k in report}
    for name, m in report["per_class"].items():
        metrics |= {f"{prefix}/{k}/{name}": m[k] for k in ("precision", "recall")}
    d = report.get("defect")
    if d:
        keep = ("threshold", "escape_rate", "false_alarm_rate", "roc_auc", "average_precision")
        metrics |= {f"{prefix}/defect/{k}": d[k] for k in keep}
    return {k: float(v) for k, v in metrics.items()}


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_cli(evaluate, cfg)


if __name__ == "__main__":
    main()
