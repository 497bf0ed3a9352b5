"""Attend Who is Weak (Jaiswal et al., WACV 2023): pruning-identified hard-to-learn samples.

Every K epochs the current model is pruned by global magnitude at several sparsities without
fine-tuning (masks only); samples on which the pruned copies disagree with the dense model are
the hard-to-learn (HTL) ones (`identify.py`), and training attends to them until the next
identification (loss weight lambda or oversampling). Spec: shared/specs/htl.md.
"""
