"""Prompt encoding shared by the closed-form methods: the UNet's text context, exactly as the pipelines build it.

``encode_prompts`` returns ``encoder_hidden_states`` (N, L, d) as ``StableDiffusionPipeline.encode_prompt``
(SD 1.x/2.x: the text encoder's last hidden state) or ``StableDiffusionXLPipeline.encode_prompt`` (SDXL: the
*penultimate* hidden states of both encoders, concatenated on the feature axis: 768 + 1280 = 2048) computes it,
in batches under ``torch.no_grad``, returned in fp32 whatever the pipeline's dtype. ``last_token_embeddings``
returns the context vector at each prompt's last subject token (``attention_mask.sum() - 2``, the index the UCE
code uses); since CLIP's text transformer is causal, only the tokens up to that index are run through it. On SD3,
``last_token_and_pooled`` returns that vector and the pooled embedding (read at the [EoT] token right after it)
from one pass, running each distinct token prefix of the prompts once.

Prompt presets (UCE's ``--expand_prompts``, ``trainscripts/uce_sd_erase.py``) and TIME's augmentations
(``apply_time.py --with_augs``) live here too, so that every method expands prompts the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..core import sd
from ..errors import ConfigError

logger = logging.getLogger(__name__)

#: UCE's object preset: "image of X", ... (``concept_type == 'object'`` in the reference code).
OBJECT_TEMPLATES: tuple[str, ...] = ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}")
#: UCE's art preset: "painting by X", ... (``concept_type == 'art'``).
ART_TEMPLATES: tuple[str, ...] = ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}")
#: TIME's ``--with_augs`` prefixes, applied to source and destination prompts alike.
TIME_TEMPLATES: tuple[str, ...] = ("A photo of {}", "An image of {}", "A picture of {}")
#: ``expand_prompts`` values of the closed-form configs.
PRESETS: dict[str, tuple[str, ...]] = {"none": (), "object": OBJECT_TEMPLATES, "art": ART_TEMPLATES}


def expand(prompt: str, templates: tuple[str, ...]) -> list[str]:
    """``[prompt] + [t.format(prompt) for t in templates]``: the prompt itself first, then its templated forms."""
    return [prompt] + [t.format(prompt) for t in templates]


def time_augment(prompt: str) -> list[str]:
    """TIME's augmentation: the prompt, then "A photo of / An image of / A picture of" + the prompt, with a
    leading capital "A" of the prompt lowered as the reference code does (``apply_time.py``)."""
    base = "a" + prompt[1:] if prompt[:1] == "A" else prompt
    return [prompt] + [t.format(base) for t in TIME_TEMPLATES]


def context_dim(pipe) -> int:
    """d, the width of ``encoder_hidden_states`` (768 for SD 1.x, 1024 for SD 2.x, 2048 for SDXL, the transformer's
    ``joint_attention_dim`` for SD3: 4096, the CLIP states zero-padded to T5's width)."""
    if sd.is_mmdit(pipe):
        return int(sd.denoiser(pipe).config.joint_attention_dim)
    return sum(int(enc.config.hidden_size) for _, enc in sd.encoders(pipe))


def device_of(pipe) -> torch.device:
    """Where the (first) text encoder's weights are."""
    return next(sd.encoders(pipe)[0][1].parameters()).device


@dataclass(frozen=True)
class Tokens:
    """Tokenised prompts, padded to ``model_max_length`` (77) as the pipelines do.

    Attributes:
        input_ids: one (N, 77) tensor per text encoder.
        attention_mask: (N, 77) of the first tokenizer (1 on BOS, the words and EOS).
        last_index: (N,) index of the last subject token, ``attention_mask.sum() - 2`` (0 = BOS for "").
    """

    input_ids: list[torch.Tensor]
    attention_mask: torch.Tensor
    last_index: torch.Tensor


def tokenize(pipe, prompts: list[str]) -> Tokens:
    ids, mask = [], None
    for tok, _ in sd.encoders(pipe):
        out = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")
        ids.append(out.input_ids)
        mask = out.attention_mask if mask is None else mask
    return Tokens(ids, mask, mask.sum(dim=1) - 2)


def _is_causal(model: torch.nn.Module) -> bool:
    # CLIP's text transformer applies a causal mask: position i only sees positions <= i.
    return type(model).__name__.startswith("CLIPText")


@torch.no_grad()
def _encode_ids(pipe, ids: list[torch.Tensor], mask: torch.Tensor, t5: bool = True) -> torch.Tensor:
    """Context (B, L, d) in fp32 for already tokenised (and possibly truncated) prompts
    (:func:`erasekit.core.sd.encode_ids`; ``t5=False``: SD3's CLIP rows alone)."""
    return sd.encode_ids(pipe, ids, attention_mask=mask, t5=t5).embeds.float()


def _length_batches(lengths: torch.Tensor, batch_size: int, pass_positions: int = 16) -> list[torch.Tensor]:
    """Row indices in batches of at most ``batch_size`` prompts, shortest first, that a causal encoder runs to their
    longest member's length. Prompts of one length share a batch (no padding position computed); a pass also reads
    every weight once, which costs about as much as ``pass_positions`` token positions (SD3's CLIP-L + CLIP-G on one
    CPU thread: about 0.4 s a pass against 23 ms a position), so the prompts of the next length join the batch when
    the padding that adds (its rows × the length step) is at most that."""
    batches: list[list[int]] = []
    length = None
    for value in torch.unique(lengths).tolist():  # ascending
        for chunk in (lengths == value).nonzero().flatten().split(batch_size):
            last = batches[-1] if batches else []
            if last and len(last) + len(chunk) <= batch_size and len(last) * (value - length) <= pass_positions:
                last += chunk.tolist()
            else:
                batches.append(chunk.tolist())
            length = value
    return [torch.tensor(b, dtype=torch.long) for b in batches]


def encode_prompts(pipe, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """``encoder_hidden_states`` (N, 77, d) fp32 for ``prompts``, on the text encoder's device."""
    tokens = tokenize(pipe, prompts)
    out = []
    for i in range(0, len(prompts), batch_size):
        out.append(_encode_ids(pipe, [x[i:i + batch_size] for x in tokens.input_ids],
                               tokens.attention_mask[i:i + batch_size]))
    return torch.cat(out) if out else torch.zeros(0, 77, context_dim(pipe), device=device_of(pipe))


def last_token_embeddings(pipe, prompts: list[str], batch_size: int = 256, offset: int = 0) -> torch.Tensor:
    """(N, d) fp32: each prompt's context vector at its last subject token (``attention_mask.sum() - 2``), or
    ``offset`` tokens after it (1: the first [EoT] token, TRCE's key).

    With causal text encoders (CLIP) only the first ``last_index + 1`` tokens are encoded, prompts sorted by
    length so that each batch is cut to its longest member: the result equals slicing the full
    ``encode_prompt`` output (up to float rounding) at a fraction of the cost.
    """
    tokens = tokenize(pipe, prompts)
    n = len(prompts)
    out = torch.zeros(n, context_dim(pipe), device=device_of(pipe))
    causal = all(_is_causal(enc) for _, enc in sd.encoders(pipe))
    order = torch.argsort(tokens.last_index, stable=True)
    for i in range(0, n, batch_size):
        rows = order[i:i + batch_size]
        last = (tokens.last_index[rows] + offset).clamp(max=tokens.attention_mask.shape[1] - 1)
        length = int(last.max()) + 1 if causal else tokens.attention_mask.shape[1]
        hidden = _encode_ids(pipe, [x[rows, :length] for x in tokens.input_ids], tokens.attention_mask[rows, :length],
                             t5=False)  # SD3: the keys are CLIP rows
        out[rows.to(out.device)] = hidden[torch.arange(len(rows)), last.to(hidden.device)]
    return out


def align_tokens(pipe, source: str, destination: str) -> list[int]:
    """TIME's token alignment (``apply_time.py``): for each of the 77 source positions, the destination position
    whose context vector it is mapped to.

    When the source's tokens are a subsequence of the destination's (TIME's use: "a pack of roses" → "a pack of
    blue roses"), each source token goes to its next match, greedily, "an" counting as "a"; the positions after
    the source's EOS (padding) follow positionally after the matched EOS, and overflow maps to 76. Otherwise
    (erasure: "cat" → "dog" or → "") the reference code fails; here the common prefix and suffix (EOS) are
    matched, each differing source token goes to the differing destination token at the same offset (clamped to
    the last one, or to the last prefix token when the destination has none), and the padding follows the EOS.
    """
    tok = sd.encoders(pipe)[0][0]
    length = tok.model_max_length

    def words(text):
        ids = tok(text, truncation=True, max_length=length).input_ids
        return ["a</w>" if t == "an</w>" else t for t in tok.convert_ids_to_tokens(ids)]

    a, b = words(source), words(destination)
    index: list[int] = []
    j = 0
    for token in a:  # TIME's greedy subsequence match
        while j < len(b) and b[j] != token:
            j += 1
        if j == len(b):
            break
        index.append(j)
        j += 1
    if len(index) < len(a):  # fallback: prefix / middle / suffix
        prefix = 0
        while prefix < min(len(a), len(b)) - 1 and a[prefix] == b[prefix]:
            prefix += 1
        suffix = 0
        while suffix < min(len(a), len(b)) - prefix and a[len(a) - 1 - suffix] == b[len(b) - 1 - suffix]:
            suffix += 1
        mid_a, mid_b = len(a) - prefix - suffix, len(b) - prefix - suffix
        index = list(range(prefix))
        for k in range(mid_a):
            index.append(prefix + min(k, mid_b - 1) if mid_b > 0 else max(prefix - 1, 0))
        index += [len(b) - suffix + k for k in range(suffix)]
        j = len(b)
    while len(index) < length:  # padding after EOS, positionally
        index.append(min(j, length - 1))
        j += 1
    return index[:length]


@torch.no_grad()
def last_token_and_pooled(pipe, prompts: list[str], batch_size: int = 256,
                          shared_prefixes: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3: (N, d) each prompt's context vector at its last subject token (:func:`last_token_embeddings`) and (N, P)
    its pooled text embedding (:func:`pooled_embeddings`), from one pass of the text encoders.

    CLIP pools at the first [EoT] token, right after the last subject token, and is causal: each prompt is encoded
    through its [EoT] only and both vectors are read from that pass (the context from the penultimate hidden states,
    the pooled output from the projection of the last one), T5's rows (after the CLIP rows) neither computed nor
    allocated: the two full-length encodings to float rounding. With ``shared_prefixes``, CLIP encoders with a
    projection (SD3's) run each distinct token prefix once, ``batch_size`` prompts at a time
    (:func:`_clip_prefix_pass`); otherwise the encoders' own forward runs batches of prompts of one length or nearly
    (:func:`_length_batches`).
    """
    if not sd.is_mmdit(pipe):
        raise ConfigError(f"pooled text embeddings are SD3's; {type(pipe).__name__} has no MMDiT transformer")
    tokens = tokenize(pipe, prompts)
    n, width = len(prompts), tokens.attention_mask.shape[1]
    device = device_of(pipe)
    dim = context_dim(pipe)
    context = torch.zeros(n, dim, device=device)
    pooled = torch.zeros(n, int(sd.denoiser(pipe).config.pooled_projection_dim), device=device)
    encoders = [enc for _, enc in sd.encoders(pipe)]
    causal = all(_is_causal(enc) for enc in encoders)
    length = (tokens.last_index + 2).clamp(max=width) if causal else torch.full((n,), width)  # through [EoT]
    if shared_prefixes and all(type(enc).__name__ == "CLIPTextModelWithProjection" for enc in encoders):
        sequences = [[tuple(row[:k]) for row, k in zip(x.tolist(), length.tolist())] for x in tokens.input_ids]
        order = sorted(range(n), key=lambda i: sequences[0][i])  # shared prefixes in one chunk
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            hidden, pool = [], []
            for enc, seqs in zip(encoders, sequences):
                penultimate, final, paths = _clip_prefix_pass(enc, [seqs[i] for i in rows])
                last = torch.tensor([path[int(tokens.last_index[i])] for path, i in zip(paths, rows)])
                eot = torch.tensor([path[-1] for path in paths])
                hidden.append(penultimate[last.to(penultimate.device)])
                pool.append(enc.text_projection(final[eot.to(final.device)]))
            keys = torch.cat(hidden, -1).float()
            index = torch.tensor(rows, device=device)
            context[index] = torch.nn.functional.pad(keys, (0, dim - keys.shape[-1])).to(device)
            pooled[index] = torch.cat(pool, -1).float().to(device)
        return context, pooled
    for rows in _length_batches(length, batch_size):
        cut = int(length[rows].max())
        cond = sd.encode_ids(pipe, [x[rows, :cut] for x in tokens.input_ids],
                             attention_mask=tokens.attention_mask[rows, :cut], t5=False)
        hidden = cond.embeds.float()
        context[rows.to(device)] = hidden[torch.arange(len(rows)), tokens.last_index[rows].to(hidden.device)].to(device)
        pooled[rows.to(device)] = cond.pooled.float().to(device)
    return context, pooled


@torch.no_grad()
def _clip_prefix_pass(encoder, sequences: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Run a CLIP text encoder (causal) once per distinct prefix of the token ``sequences``.

    Position i of a causal encoder depends on tokens 0..i only, so prompts that begin alike ("a striped box on ...",
    "a striped disc on ...") share the states of their common prefix: each distinct prefix is one node of a prefix
    tree, run once, its attention reading its ancestors' keys and values (the same numbers the encoder's causal mask
    lets it read). Each layer runs on all nodes together, as the encoder's own layer does on (prompt, position)
    rows: ``layer_norm1`` → q/k/v → scaled dot-product attention → ``out_proj``, residual; ``layer_norm2`` → MLP,
    residual (``CLIPEncoderLayer``; tested equal to the encoder's forward).

    Returns:
        the penultimate hidden states (the input of the last layer: ``hidden_states[-2]``) (M, D), the last hidden
        states after ``final_layer_norm`` (M, D), and for each sequence its node index at every position.
    """
    children: dict[tuple[int, int], int] = {}
    parent, token, depth, paths = [], [], [], []
    for seq in sequences:
        path, node = [], -1
        for i, t in enumerate(seq):
            key = (node, t)
            if key not in children:
                children[key] = len(token)
                parent.append(node)
                token.append(t)
                depth.append(i)
            node = children[key]
            path.append(node)
        paths.append(path)
    ancestors: list[list[int]] = []
    for node, up in enumerate(parent):  # parents come before their children
        ancestors.append((ancestors[up] if up >= 0 else []) + [node])
    device = next(encoder.parameters()).device
    groups = []
    for d in sorted(set(depth)):
        nodes = [i for i, x in enumerate(depth) if x == d]
        groups.append((torch.tensor(nodes, device=device), torch.tensor([ancestors[i] for i in nodes], device=device)))
    model = encoder.text_model
    x = (model.embeddings.token_embedding(torch.tensor(token, device=device))
         + model.embeddings.position_embedding(torch.tensor(depth, device=device)))
    layers = model.encoder.layers
    penultimate = x
    for index, layer in enumerate(layers):
        if index == len(layers) - 1:
            penultimate = x
        attn = layer.self_attn
        h = layer.layer_norm1(x)
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        out = torch.empty_like(q)
        split = lambda t: t.view(*t.shape[:-1], attn.num_heads, attn.head_dim).transpose(-3, -2)  # noqa: E731
        for nodes, anc in groups:  # (N, heads, 1 or depth + 1, head_dim)
            o = torch.nn.functional.scaled_dot_product_attention(split(q[nodes].unsqueeze(1)), split(k[anc]),
                                                                 split(v[anc]), scale=attn.scale)
            out[nodes] = o.transpose(-3, -2).reshape(len(nodes), -1)
        x = x + attn.out_proj(out)
        x = x + layer.mlp(layer.layer_norm2(x))
    return penultimate, model.final_layer_norm(x), paths


def pooled_embeddings(pipe, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """(N, P) fp32: each prompt's pooled text embedding as SD3's ``encode_prompt`` gives it (both CLIP encoders'
    projections, concatenated), each prompt encoded through its [EoT] only by the encoders' own forward
    (:func:`last_token_and_pooled`)."""
    return last_token_and_pooled(pipe, prompts, batch_size, shared_prefixes=False)[1]
