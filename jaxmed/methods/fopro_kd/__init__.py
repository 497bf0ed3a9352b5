"""FoPro-KD (Elbatel et al., IEEE TMI 2023): effective knowledge distillation (EKD) from a frozen
pretrained teacher into a long-tailed student, with our Fourier Prompt Generator (FPG), and the
long-tailed / KD baselines it is compared with, each a pure step over one pytree state.

  objectives.py  EKD and both FPG objectives as pure functions
  heads.py       the student's projector p and fc_p
  step.py        KDState, module-level jitted steps (teacher beside the state: big_vision's
                 distill pattern), every method's loss
  teachers.py    teachers from a jaxmed workdir or a PyTorch file; the quick teacher stage
  run.py         one (method, seed) run through the kit's `fit`; the FPG / probe stage
  report.py      comparison.csv, summary.md, figures

`config.kd.methods` x `config.kd.seeds` run on the same data through `jaxmed.train.comparison`
(section "kd"); the teacher is loaded once and shared by every run.
Spec: shared/specs/fopro_kd.md.
"""

from __future__ import annotations

import logging

import ml_collections

from jaxmed import data as data_lib
from jaxmed.methods import supervised
from jaxmed.methods.fopro_kd import report, run, step, teachers
from jaxmed.train import comparison, sharding
from jaxmed.train.workdir import write_config

log = logging.getLogger(__name__)

METHODS = step.METHODS
HARMLESS_KEYS = ("train.progress", "train.log_every", "kd.report_examples",
                 *comparison.harmless_keys("kd"))


def default_config() -> ml_collections.ConfigDict:
    """Every key FoPro-KD reads; the defaults are the spec's (Adam 3e-4, no weight decay,
    clip 5, batch 32, 100 epochs, ResNet-18 student from scratch, w_kd 3)."""
    c = supervised.base_config()
    c.method = "fopro_kd"
    c.model.name = "resnet18"
    c.train.update(dict(optimizer="adam", lr=3e-4, weight_decay=0.0, grad_clip_norm=5.0,
                        batch_size=32, epochs=100, loss="balanced_softmax"))
    c.kd = ml_collections.ConfigDict(dict(
        methods=("balanced_softmax", "ekd", "ekd_fpg"),  # any of step.METHODS
        seeds=(0,),
        parallel_seeds=True,  # a method's seeds as one program (jaxmed.train.seeds)
        teacher="",  # a jaxmed workdir (best checkpoint + its config.json model) or a .pth
        teacher_model="",  # a .pth's architecture: resnet18, resnet50, moco_v2_resnet50,
        # dinov2_vits14, dinov2_vitb14
        teacher_image_size=0,  # teacher input side (0: a workdir's own, a .pth the student's;
        # DINOv2: a multiple of 14)
        teacher_classes=(),  # the classes of a .pth teacher's head outputs, in order (checked
        # against the data's when its head has their count; a workdir's come from its data)
        teacher_stage=ml_collections.ConfigDict(dict(  # train a teacher first (quick configs)
            epochs=0, num_train=0, model="resnet20", width=16, stem="small", lr=1e-3)),
        w_kd=3.0,  # EKD's `free_u`
        w_kd_ramp=0.0,  # > 0: w_kd ramps down linearly per epoch from this fraction of
        # training to the end (Fed-MAS --LRD from start_free_rd; its default 30 of 100: 0.3)
        kd_class_weights=False,  # the KD term x per-class weights: ones until drw_start, then
        # effective-number weights (Fed-MAS balanced_free); batch mean of w_y kd
        w_feature=1.0, w_hinton=1.0, temperature=4.0,  # w_hinton: hinton_kd and balanced_kd
        projector_hidden=512,
        ldam_max_margin=0.5, ldam_scale=30.0,
        drw_start=0.8,  # fraction of training; DRW / KD class weights from the start of epoch
        # int(drw_start * epochs), as LDAM-DRW and Fed-MAS
        cb_beta=0.9999, focal_gamma=2.0, la_tau=1.0,
        cb_reduction="weighted",  # class_balanced: 'weighted' sum(w_y l) / sum(w_y) (torch's
        # CrossEntropyLoss(weight=w), Fed-MAS CB) or 'mean' mean(w_y l) (Cui et al.)
        fpg=ml_collections.ConfigDict(dict(
            beta=1.0,  # relative size of the learnable low-frequency window (1: all)
            steps=200,  # discriminative stage: prompt + probe steps before EKD
            lr=1e-2,  # Adam lr of the prompt (and the probe)
            penalty=1.0,  # adversarial: weight of mean (m - 1)^2
        )),
        group_boundaries=(),  # () = thirds of the classes by count; (many, few) otherwise
        report_examples=6,  # prompted test images drawn in the report
    ))
    return c


def check_config(config) -> None:
    kd = config.kd
    comparison.check_methods_and_seeds(kd.methods, kd.seeds, METHODS, "kd")
    needs = [m for m in kd.methods if m not in step.STUDENT_ONLY]
    if needs and not kd.teacher and kd.teacher_stage.epochs <= 0:
        raise ValueError(f"config.kd.teacher is empty but methods {needs} need a teacher: name "
                         "a jaxmed workdir or a PyTorch file (+ config.kd.teacher_model), or set "
                         "config.kd.teacher_stage.epochs > 0")
    if kd.teacher:  # exists; a jaxmed workdir with a checkpoint, or a file + its architecture
        teachers.check_teacher_path(kd)
    names = kd.teacher_classes
    if isinstance(names, str) or not isinstance(names, (tuple, list)) or not all(
            isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"config.kd.teacher_classes={names!r}: a tuple of distinct class names "
                         "(a .pth teacher's head outputs, in order), or ()")
    if kd.teacher_model and kd.teacher_model not in teachers.TORCH_ARCHS:
        raise ValueError(f"config.kd.teacher_model={kd.teacher_model!r}: use one of "
                         f"{sorted(teachers.TORCH_ARCHS)}")
    if not 0.0 <= kd.fpg.beta <= 1.0:
        raise ValueError(f"config.kd.fpg.beta={kd.fpg.beta}: must be in [0, 1]")
    if "ekd_fpg" in kd.methods and kd.fpg.steps <= 0:
        raise ValueError("config.kd.fpg.steps must be > 0 for method 'ekd_fpg'")
    if len(kd.group_boundaries) not in (0, 2):
        raise ValueError(f"config.kd.group_boundaries={tuple(kd.group_boundaries)}: () or "
                         "(many, few)")
    if not 0.0 <= kd.drw_start <= 1.0:
        raise ValueError(f"config.kd.drw_start={kd.drw_start}: a fraction of training")
    if kd.cb_reduction not in step.CB_REDUCTIONS:  # (step.Setup checks again, per run)
        raise ValueError(f"config.kd.cb_reduction={kd.cb_reduction!r}: one of "
                         f"{step.CB_REDUCTIONS}")
    if not 0.0 <= kd.w_kd_ramp < 1.0:
        raise ValueError(f"config.kd.w_kd_ramp={kd.w_kd_ramp}: 0 (off) or the fraction of "
                         "training in (0, 1) where w_kd starts ramping down")


def train_and_evaluate(config, workdir: str) -> dict:
    """Teacher (trained first if configured), every method x seed, then the report. Returns
    the mean test metrics per method ({'<method>/test/tail_acc': ...})."""
    check_config(config)
    write_config(config, workdir, harmless=HARMLESS_KEYS)
    kd = config.kd
    mesh = sharding.make_mesh()
    ds = data_lib.build(config.data)
    teacher = None
    if any(m not in step.STUDENT_ONLY for m in kd.methods):
        size = data_lib.image_size(config.data, ds.info)
        if kd.teacher:
            teacher = teachers.load_teacher(kd, size)
        else:
            path = teachers.train_teacher_stage(config, workdir)
            teacher = teachers.from_workdir(path, int(kd.teacher_image_size),
                                            class_names=kd.teacher_classes)
        # its head's classes against the data's, its channels adapted to the student's, and
        # the same teacher as in every run this comparison already holds
        teacher = teachers.for_data(teacher, ds.info.class_names,
                                    data_lib.image_channels(config.data, ds.info))
        teachers.check_identity(workdir, teacher)
        report.teacher_accuracy(teacher)  # its result.json, checked before any run
        log.info("teacher %s: %d-d features, %d-class head, %d channel(s) at %d px",
                 teacher.source, teacher.feature_dim, teacher.num_classes, teacher.channels,
                 teacher.image_size)

    def write_report(results):
        summary = report.write_report(workdir, config, results, ds, teacher, mesh)
        return {f"{m}/{k}": v for m, row in summary.items() for k, v in row.items()
                if k in report.METRICS}

    def run_one(method, seed, run_workdir, sub):
        if method not in step.STUDENT_ONLY:  # the teacher its runs were made with
            teachers.record_identity(workdir, teacher)
        return run.run_one(method, seed, run_workdir, sub, ds=ds, teacher_model=teacher,
                           mesh=mesh)

    def run_group(method, seeds, run_workdirs, subs, group_dir):
        if method not in step.STUDENT_ONLY:
            teachers.record_identity(workdir, teacher)
        return run.run_group(method, seeds, run_workdirs, subs, group_dir, ds=ds,
                             teacher_model=teacher, mesh=mesh)

    return comparison.compare(workdir, config, "kd", run_one, write_report,
                              harmless=HARMLESS_KEYS, run_group=run_group)


__all__ = ["HARMLESS_KEYS", "METHODS", "check_config", "default_config", "train_and_evaluate"]
