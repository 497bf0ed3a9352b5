"""TEAR (MICCAI 2022) and the semi-supervised family it is compared with.

The pieces are USB's hooks (pseudo-labelling, masking, distribution alignment, weighting) as
small pure jnp functions over `flax.struct.dataclass` states, composed in one jitted SSL step:
`pseudo_labels` (hard / soft / sharpened labels, the 32-batch DA queue, SoftMatch's uniform
alignment), `thresholds` (FixMatch, FlexMatch, FreeMatch masks, SoftMatch weights), `teacher`
(EMA teacher), `adapl` (adaptive soft pseudo labels), `prototypes` (k-means + IPH loss).
Spec: ../shared/specs/tear.md.
"""
