"""BiasPruner and the continual baselines on the synthetic biased sequence, fewer images, CPU.

    jaxmed --config=configs/biaspruner/quick.py --workdir=workdirs/biaspruner_quick

The sequence and settings of benchmark.py (jaxmed.data.synthetic_bias: two binary tasks, plus /
cross then square / diamond, red or green glyphs in both, the colour matching the label in 97%
of training images, the outline wrong on 10%; ResNet-8 width 16; flips and shifts; balanced
fine-tune weights; task selection by stem statistics) on fewer images: 2,500 training images
per task (~75 bias-conflicting), 400 unbiased test images per task; BiasPruner, PackNet,
fine-tune and EWC (LwF, LfF and joint only in benchmark.py, for time), seeds 0-2 (report:
mean ± SE, verdicts by the kit's rule). At 1,500 images (~45 conflicting) BiasPruner stayed
biased (ACC 0.64, EOdd 1.42).

Runtime: 22 min wall on the 2-core VM of 2026-12-03 (the 12 runs' own wall times, 1,321 s, out
of a 5-method run with LwF: 28 min 17 s, 2,649 CPU s; the host stole 16-24% of the CPU then);
each run 95-128 s. The same config with 2 seeds and LwF took 9 min 23 s, 931 CPU s, on the
quiet VM of 2026-11-25, below what one run costs with the code of that day or today (A/B in
benchmarks/RESULTS.md: 146 vs 142 CPU s): not a code regression. `:tiny` (the tests' variant)
runs in seconds.

Measured result (3 seeds, mean ± SE; `benchmarks/results/cpu/biaspruner_quick_3seeds_
comparison.csv`): final task-agnostic ACC BiasPruner 0.885 ± 0.053, PackNet 0.537 ± 0.022, EWC
0.359 ± 0.054, fine-tune 0.278 ± 0.004 (LwF 0.295 ± 0.038); on the conflicting images 0.861 vs
0.080 / 0.064 / 0.022; EOdd BiasPruner 0.129 ± 0.018 vs PackNet 1.834, fine-tune 1.438, EWC
1.289 (LwF 1.249): BiasPruner better than every baseline on all three, beyond 2 SE; task
selection 1.000 (the entropy rule: 0.183)."""

from jaxmed.config_check import sibling


def get_config(arg: str = ""):
    c = sibling(__file__).synthetic_config()
    s = c.data.synthetic_bias
    s.num_train, s.num_val, s.num_test = 2500, 50, 400
    # LwF (and LfF, joint) only in benchmark.py, for time (module docstring)
    c.continual.methods = ("biaspruner", "packnet", "finetune", "ewc")
    c.continual.seeds = (0, 1, 2)
    if arg == "tiny":  # tests: seconds
        sibling(__file__).tiny(c)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} (use '' or 'tiny')")
    return c
