"""An experiment toward issue #22 §2 (not a registered method): the `layered` recipe whose ESD-u part is trained
against soft-prompt attacks on the student UNet, AdvUnlearn's bi-level loop (Zhang et al., NeurIPS 2024, Eq. 4–5)
moved from the text encoder to the UNet layers ESD-u trains (as RACE, Kim et al., ECCV 2024, trains ESD against
adversarial text embeddings).

Each step draws ESD's batch (tinyworld's templates, the siblings held: ESD-u's preset in `layered`), rolls it out
from the frozen model, and before the student's update runs `erasekit.attacks.unlearndiffatk.soft_prompt_attack`
for ``INNER`` steps against the *student* on the first sample, with the frozen model's ε₀(x_t, T(c)) as the target,
alternating between UnlearnDiffAtk's threat (3 free token embeddings before the prompt) and P4D-N's (16 free token
embeddings, no prompt), each warm-started from its last round; the first sample's student input is the attacked
prompt, its target ESD's. ``--mode pez`` replaces the free-embedding threat by P4D's own: 16 *vocabulary tokens*
found by PEZ (continuous embeddings projected onto the nearest tokens, straight-through, AdamW lr 0.1, as
`erasekit.attacks.p4d`), ``--pez-inner`` steps per outer step against the student on the first ``--pez-rows``
samples (the odd outer steps are its rounds; the even ones run the prefix threat), warm-started and restarted at
random every ``--pez-reset`` of its rounds (odd: at the outer steps that are odd multiples of it); the attacked
tokens are then those samples' student input. With ``--unsaid S`` a share of the samples leave the concept unsaid
(ESD's ``unsaid``). ``--mode hidden`` attacks the text encoder's output itself, the space every prompt lands in: a
perturbation of the hidden states of the first sample's template with the concept unsaid, ``--inner`` Adam steps
(``--hidden-lr``) against the student, warm-started and zeroed every ``--pez-reset`` of its rounds (the odd steps;
the even ones run the prefix threat). ``--mode none`` runs no adversary (plain ESD-u with this loss). ``--anchor A``
sends the samples that name the concept to the frozen model's ε on the same template naming A instead of ESD's
negatively guided ε (Concept Ablation's model-based target, Kumari et al., ICCV 2023); with ``--anchor-guided`` to
``ε₀(T(A)) − η[ε₀(T(c)) − ε₀(T(A))]``. With several anchors a sample's is the one its template's index picks
(index mod their count), so each template keeps one anchor. With ``--unsaid-anchored`` (and ``--unsaid``,
``--anchor-guided``) the samples that leave the concept unsaid are guided from their anchor too, so that the model
draws a sibling, not a blob, where nothing names the shape. ``--bank-every K`` keeps the attacked sample's text
encoding every K steps in a bank (STEREO's "search thoroughly enough" set, Srivatsan et al., 2024, replayed instead
of erased once at the end): each step the ``--bank-rows`` samples after the attacked ones see a random bank entry.
The bank and the adversaries' states live in memory only: a run interrupted starts again. The ESD-u adapter is stacked with UCE's (tinyworld
preset) into one file; ``robust_tinyworld.py --files`` judges it. The ``both`` threat with several guided anchors is
registered as the method ``layered-adv`` (ESD's ``adversary_steps`` and ``anchors``, :mod:`erasekit.methods.esd`);
this script keeps the other threats and the records of the rows it made.

    python benchmarks/adversarial_esd_tinyworld.py circle OUT [--inner 30] [--unsaid 0.25] [--mode pez]
    python benchmarks/robust_tinyworld.py NAME --concepts circle --files OUT.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch
import torch.nn.functional as F

from erasekit import erase
from erasekit.attacks.unlearndiffatk import SoftPromptConfig, soft_prompt_attack
from erasekit.core import sd
from erasekit.loading import load_pipeline
from erasekit.merge import stack
from erasekit.methods import esd, trainer
from erasekit.methods.presets import resolve
from erasekit.methods.trainer import Cond, PromptTable, ddim_scheduler, latent_shape, predict, rollout

ESD_U = {"preserve_related": True, "preserve_weight": 1.0, "iterations": 400}  # `layered`'s tinyworld ESD-u part


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("concept")
    ap.add_argument("out", help="file stem: OUT.safetensors (UCE + ESD-u) and OUT-esdu.safetensors")
    ap.add_argument("--inner", type=int, default=30, help="inner attack steps per outer step")
    ap.add_argument("--mode", choices=["prefix", "free", "both", "pez", "hidden", "none"],
                    default="both", help="the threat in the loop; none: plain ESD-u (the same loss, no adversary)")
    ap.add_argument("--anchor", nargs="+", default=[],
                    help="the erased samples' target is the frozen model's ε on the same template naming this "
                         "concept instead of ESD's negatively guided ε (Concept Ablation's model-based target); "
                         "several: each sample's by its template (module docstring)")
    ap.add_argument("--anchor-guided", action="store_true",
                    help="with --anchor: the anchor's ε negatively guided away from the concept, "
                         "ε₀(T(a)) − η[ε₀(T(c)) − ε₀(T(a))], instead of the anchor's ε alone")
    ap.add_argument("--pez-inner", type=int, default=10, help="pez: adversary steps per outer step")
    ap.add_argument("--pez-rows", type=int, default=2, help="pez: samples the adversary attacks and the student sees")
    ap.add_argument("--pez-reset", type=int, default=25,
                    help="pez, hidden: a fresh start every this many of its rounds (odd; module docstring)")
    ap.add_argument("--unsaid", type=float, default=0.0)
    ap.add_argument("--unsaid-anchored", action="store_true",
                    help="with --unsaid and --anchor-guided: the unsaid samples too are guided from their anchor")
    ap.add_argument("--bank-every", type=int, default=0,
                    help="keep the attacked prompt's encoding every this many steps (0: no bank)")
    ap.add_argument("--bank-rows", type=int, default=1,
                    help="samples after the attacked ones whose student input is a random bank entry")
    ap.add_argument("--hidden-lr", type=float, default=1e-2, help="hidden: the adversary's Adam learning rate")
    ap.add_argument("--iterations", type=int, default=ESD_U["iterations"])
    ap.add_argument("--rank", type=int, default=4, help="ESD-u's LoRA rank (its preset: 4)")
    ap.add_argument("--preserve-weight", type=float, default=ESD_U["preserve_weight"],
                    help="ESD-u's weight on holding the siblings (its preset in `layered`: 1)")
    ap.add_argument("--negative-guidance", type=float, help="ESD's η (default: its tinyworld preset's)")
    args = ap.parse_args()
    if args.pez_reset < 1 or args.pez_reset % 2 == 0:  # the PEZ rounds are the odd steps: an even multiple is none
        ap.error(f"--pez-reset must be odd and ≥ 1, got {args.pez_reset}")
    if args.anchor_guided and not args.anchor:
        ap.error("--anchor-guided needs --anchor")
    if args.unsaid_anchored and not (args.unsaid and args.anchor_guided):
        ap.error("--unsaid-anchored needs --unsaid and --anchor-guided")
    if args.bank_every < 0 or args.bank_rows < 1:
        ap.error("--bank-every must be ≥ 0 and --bank-rows ≥ 1")
    if args.pez_rows < 1:
        ap.error(f"--pez-rows must be ≥ 1, got {args.pez_rows}")
    torch.set_num_threads(1)
    pipe = load_pipeline(None, device="cpu")
    options = {**ESD_U, "iterations": args.iterations, "rank": args.rank, "preserve_weight": args.preserve_weight}
    if args.negative_guidance is not None:
        options["negative_guidance"] = args.negative_guidance
    config = resolve("esd-u", pipe, options, (args.concept,))
    unet = sd.denoiser(pipe)
    kept, templates = esd.preserved(config), trainer.training_templates(config)
    empty = [""] if args.unsaid or args.mode == "hidden" else []  # the templates with the concept unsaid
    table = PromptTable(pipe, templates, [args.concept, args.concept] + kept + empty
                        + args.anchor, config.resolution)
    first_anchor = len(table.names) - len(args.anchor)
    uncond, scheduler = table.uncond, ddim_scheduler(pipe, config.num_inference_steps)
    shape = latent_shape(pipe, config.batch_size, config.resolution)
    n, eta = shape[0], config.negative_guidance
    if args.pez_rows > n:  # the batch size is the preset's, known once it is resolved
        ap.error(f"--pez-rows must be at most ESD-u's batch size {n}, got {args.pez_rows}")
    if args.bank_every and args.bank_rows + (args.pez_rows if args.mode == "pez" else 1) > n:
        ap.error(f"--bank-rows and the attacked samples must fit in ESD-u's batch of {n}")
    n_unsaid = min(math.ceil(args.unsaid * n), n - 1) if args.unsaid else 0  # as ESD's `unsaid`
    unsaid = torch.arange(n) >= n - n_unsaid  # the batch's last samples leave the concept unsaid
    unsaid_row = 2 + len(kept)
    threats = {"prefix": SoftPromptConfig(k=3, insertion="prefix_k", space="word_embedding", steps=args.inner,
                                          lr=1e-2, weight_decay=0.0, timesteps="random"),
               "free": SoftPromptConfig(k=16, insertion="prefix_k", space="word_embedding", steps=args.inner,
                                        lr=1e-2, weight_decay=0.0, timesteps="random")}
    state = {"prefix": None, "free": None}
    E = sd.token_embeddings(pipe)[0].float()
    allowed = sd.allowed_token_ids(pipe)
    En = F.normalize(E[allowed], dim=-1)
    lay = sd.layout(pipe.tokenizer, "", 16, "replace_k")
    pez = {}  # the PEZ adversary's continuous embeddings and optimiser, kept across outer steps

    def nearest(cont):  # the vocabulary token nearest each slot by cosine (PEZ's projection)
        with torch.no_grad():
            return allowed[(F.normalize(cont, dim=-1) @ En.T).argmax(-1)]

    def pez_cond(ids, cont=None):
        slots = E[ids] if cont is None else cont + (E[ids] - cont).detach()
        return Cond(sd.encode_ids(pipe, sd.ids_per_encoder(pipe, lay.ids(ids.tolist())),
                                  [sd.slot_override(lay, slots[None])]).embeds)

    def pez_attack(step, gen, x, t, target):
        """P4D-N's threat (the audit's ``p4d``): 16 vocabulary tokens, AdamW lr 0.1 on continuous embeddings whose
        nearest tokens (cosine) are what the loss sees (PEZ, straight-through); the student's ε is matched to
        ``target``."""
        if step % args.pez_reset == 0 or "cont" not in pez:
            init = allowed[torch.randint(len(allowed), (16,), generator=gen)]
            pez["cont"] = E[init].clone().requires_grad_(True)
            pez["opt"] = torch.optim.AdamW([pez["cont"]], lr=0.1, weight_decay=0.1)
        cont, opt = pez["cont"], pez["opt"]
        for _ in range(args.pez_inner):
            cond = pez_cond(nearest(cont), cont)
            loss = F.mse_loss(predict(unet, x, t, cond.repeat(x.shape[0])).float(), target)
            cont.grad, = torch.autograd.grad(loss, cont)
            opt.step()
        with torch.no_grad():
            return pez_cond(nearest(cont))

    hid = {}  # the hidden-state adversary's perturbation, kept across its rounds

    def hidden_attack(step, gen, x, t, start, target):
        """The text encoder's output itself attacked (the threat every prompt lies in): a perturbation of the
        hidden states of ``start`` (the template with the concept unsaid), Adam lr ``--hidden-lr`` for ``--inner``
        steps, so that the student's ε matches ``target``; warm-started, zeroed every ``--pez-reset`` rounds."""
        if step % args.pez_reset == 0 or "delta" not in hid:
            hid["delta"] = torch.zeros_like(start.hidden, requires_grad=True)
            hid["opt"] = torch.optim.Adam([hid["delta"]], lr=args.hidden_lr)
        delta, opt = hid["delta"], hid["opt"]
        for _ in range(args.inner):
            loss = F.mse_loss(predict(unet, x, t, Cond(start.hidden + delta)).float(), target)
            delta.grad, = torch.autograd.grad(loss, delta)
            opt.step()
        return Cond((start.hidden + delta).detach())

    bank = []  # past attacked encodings (STEREO's search-thoroughly-enough set, replayed)

    def loss_for(deltas):
        def loss_fn(step, gen, part=None):
            rows = torch.randint(len(templates), (n,), generator=gen).tolist()
            steps = int(torch.randint(config.num_inference_steps, (), generator=gen))
            erased = table.batch(0, rows)
            source = Cond.cat([table.batch(unsaid_row if u else 0, [r])
                               for u, r in zip(unsaid.tolist(), rows)])
            with deltas.disabled(), torch.no_grad():  # the frozen teacher
                x, t = rollout(unet, scheduler, source, uncond, config.start_guidance, steps, shape, gen)
                held = [uncond.repeat(n), table.batch(2 + int(torch.randint(len(kept), (), generator=gen)), rows)]
                anchor = [Cond.cat([table.batch(first_anchor + r % len(args.anchor), [r]) for r in rows])
                          ] if args.anchor else []  # each template keeps one anchor
                e_erase, e_from, *e_held = predict(unet, torch.cat([x] * (4 + len(anchor))), t,
                                                   Cond.cat([erased, source] + held + anchor)).float().chunk(
                                                       4 + len(anchor))
                e_anchor = e_held.pop() if args.anchor else None
            target = e_from - eta * (e_erase - torch.where(unsaid.view(-1, 1, 1, 1), e_from, e_held[0]))
            if args.anchor:  # the samples that name the concept go to the anchor's ε instead
                to = e_anchor - eta * (e_erase - e_anchor) if args.anchor_guided else e_anchor
                target = to if args.unsaid_anchored else torch.where(unsaid.view(-1, 1, 1, 1), target, to)
            if args.mode == "pez" and step % 2:
                r = args.pez_rows
                attacked = pez_attack(step, gen, x[:r], t, e_erase[:r])
                attacked = Cond(attacked.hidden.to(x.dtype)).repeat(r)
                first = Cond.cat([attacked, source[r:]])
            elif args.mode == "hidden" and step % 2:
                first = Cond.cat([hidden_attack(step, gen, x[:1], t, table.batch(unsaid_row, rows[:1]),
                                                e_erase[:1]), source[1:]])
            elif args.mode == "none":
                first = source
            else:
                kind = args.mode if args.mode not in ("both", "pez", "hidden") else ("free" if step % 2 else "prefix")
                prompt = "" if kind == "free" else templates[rows[0]].replace("{}", args.concept)
                soft = soft_prompt_attack(pipe, prompt, config=threats[kind], init=state[kind], generator=gen,
                                          target_fn=lambda s, g: (x[:1], t, e_erase[:1]))  # against the student
                state[kind] = soft.delta
                with torch.no_grad():
                    attacked = Cond(soft.cond(pipe).embeds.to(x.dtype))
                first = Cond.cat([attacked, source[1:]])
            if args.bank_every:
                if step % args.bank_every == 0 and args.mode != "none":
                    bank.append(first.hidden[:1].detach().clone())
                if bank:
                    b = args.bank_rows
                    pick = torch.randint(len(bank), (b,), generator=gen).tolist()
                    replay = Cond(torch.cat([bank[i] for i in pick]).to(x.dtype))
                    skip = args.pez_rows if (args.mode == "pez" and step % 2) else 1
                    first = Cond.cat([Cond(first.hidden[:skip]), replay, Cond(first.hidden[skip + b:])])
            student, *s_held = predict(unet, torch.cat([x] * 3), t,
                                       Cond.cat([first] + held)).float().chunk(3)
            return F.mse_loss(student, target), config.preserve_weight * sum(
                F.mse_loss(s, e) for s, e in zip(s_held, e_held))
        return loss_fn

    made_by = {"script": "benchmarks/adversarial_esd_tinyworld.py", "inner": args.inner, "mode": args.mode,
               "unsaid": args.unsaid, "pez_inner": args.pez_inner, "pez_rows": args.pez_rows,
               "pez_reset": args.pez_reset, "anchor": args.anchor, "anchor_guided": args.anchor_guided,
               "hidden_lr": args.hidden_lr, "bank_every": args.bank_every, "bank_rows": args.bank_rows,
               "unsaid_anchored": args.unsaid_anchored}  # the file's config is ESD-u's; this records the loop around it
    rest = trainer.train(pipe, config, esd.select(pipe, "esd-u"), loss_for, "esd-u")
    rest = dataclasses.replace(rest, info={**rest.info, "adversarial": made_by})
    rest.save(f"{args.out}-esdu.safetensors")
    both = stack([erase(pipe, "uce", [args.concept]), rest], [1.0, 1.0])
    dataclasses.replace(both, info={**both.info, "adversarial": made_by}).save(f"{args.out}.safetensors")
    print("saved", f"{args.out}.safetensors")


if __name__ == "__main__":
    main()
