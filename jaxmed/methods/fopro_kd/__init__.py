"""FoPro-KD (Elbatel et al., IEEE TMI 2023): effective knowledge distillation (EKD) from a frozen
pretrained teacher into a long-tailed student, with our Fourier Prompt Generator (FPG).

`objectives` holds the losses as pure functions, `heads` the student's projector heads; the
trainer composes them (teacher and student in one params dict, only the student differentiated
and checkpointed: big_vision's distill pattern). Spec: shared/specs/fopro_kd.md.
"""
