"""Many concepts at once on tinyworld: one adapter erasing circle, square, red and striped together (``multi``) and
four single-concept adapters loaded together (``composed``), at the full suite's erasure budget (8 canonical prompts
× seeds 0, 1 per concept, their synonyms, 16 prompts showing none of the four), without attacks.

    python benchmarks/multi_concept_tinyworld.py [METHOD ...]     # default: uce rece spm

Rows are the bench's (:func:`erasekit.bench.run_suite` with the budget below), written as they finish to
``benchmarks/results-multi-erasure-multi-composed.json`` (resumable through ``benchmarks/.bench-multi-erasure``).
"""

import sys

from erasekit.bench import BUDGETS, Budget, run_suite

full = BUDGETS["full"]
BUDGET = Budget("multi-erasure", prompts=full.prompts, seeds=full.seeds, preserve=full.preserve, attack_prompts=1,
                attack_entries=(), trained_entries=("multi", "composed"), train_scale=1.0)

if __name__ == "__main__":
    methods = sys.argv[1:] or ["uce", "rece", "spm"]
    results = run_suite(BUDGET, "benchmarks", methods=methods, entries=["multi", "composed"])
    for key, row in results["rows"].items():
        print(f"{key}: erased {row['erasure_rate']:.3f} (synonyms {row['paraphrase_erasure_rate']:.3f}), "
              f"preservation drop {row['preservation_drop']:.3f}, erase {row['erase_seconds']} s, "
              f"{row['adapter_mb']} MB")
