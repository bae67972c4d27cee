"""Presets: UniSD* (the paper's recipe) and every named mode of the research code (§2.6, §2.8, §6.2).

Component defaults are the research code's direct-CLI defaults; the presets carry its experiment
runner's values, so ``--preset agreement_tok_retrieval`` reruns that experiment's settings by name.
A preset's ``run`` holds the run settings the runner changed for that method only (UniSD*'s halved
batch); the ones it used for every method are ``--recipe paper`` (see :mod:`unisd.recipes`).
"""

from __future__ import annotations

from unisd.components import Preset

# The runner's values (unisd-method.md §6.2).
AGREEMENT_GAMMA = 0.01
NUM_CONTEXTS = 3
INDUCTION_DEMOS = 3
STAR = {
    "agreement": {"level": "token", "builder": "retrieval", "gamma": 0.001, "num_contexts": NUM_CONTEXTS,
                  "induction_num_demos": INDUCTION_DEMOS},
    "ema": {"sync_steps": 10, "beta": 0.98},
    "contrastive": {"weight": 0.01, "margin": 0.1},
    "matching": {"mode": "joint", "weight": 0.01},
}
# The runner halved UniSD*'s per-device batch (memory, §2.6); half of our default 4. Run-level settings
# every method got (prompt and completion budgets, full MBPP) are the paper recipe's: unisd.recipes.
STAR_RUN = {"batch_size": 2}
STAR_HELP = ("UniSD*: token agreement (retrieval, γ=0.001, K=3) + EMA teacher (sync 10, β=0.98) + "
             "contrastive (0.01, margin 0.1) + joint feature matching (0.01)")


def _agreement_modes() -> list[Preset]:
    out = []
    for level, short in (("seq", "seq"), ("token", "tok")):
        for builder in ("random", "retrieval", "induction"):
            values = {"level": level, "builder": builder, "gamma": AGREEMENT_GAMMA, "num_contexts": NUM_CONTEXTS,
                      "induction_num_demos": INDUCTION_DEMOS}
            out.append(Preset(f"agreement_{short}_{builder}", {"agreement": values},
                              help=f"{'Sequence' if level == 'seq' else 'Token'}-level agreement, {builder} contexts "
                                   f"(γ={AGREEMENT_GAMMA}, K={NUM_CONTEXTS})"))
    return out


def all_presets() -> list[Preset]:
    return [
        Preset("unisd-star", STAR, help=STAR_HELP, run=STAR_RUN),
        *_agreement_modes(),
        Preset("ema", {"ema": {"sync_steps": 10, "beta": 0.9}}, help="EMA teacher (sync 10, β=0.9)"),
        Preset("contrastive", {"contrastive": {"weight": 0.1, "margin": 0.5}},
               help="Contrastive negatives (λ=0.1, margin 0.5)"),
        Preset("match_joint", {"matching": {"mode": "joint", "weight": 0.1}},
               help="Divergence + 0.1 · hidden-state MSE"),
        Preset("match_repr", {"matching": {"mode": "repr"}}, help="Hidden-state MSE only (no divergence term)"),
        # The runner's clip subcommand passes --alpha 0.0 (forward KL) whatever the run's default.
        Preset("clip", {"clip": {"max_value": 10.0}}, help="Per-token divergence clipped at 10", run={"alpha": 0.0}),
    ]
