"""Closed-form family (UCE, TIME, RECE): the math of Eq. 7, its low-rank factorisation, exact merging, the
registry and the Python entry. Tiny random pipelines of each family, plus SD 1.5's full shapes once."""

import dataclasses
import typing

import pytest
import torch

from erasekit.api import erase
from erasekit.errors import ConfigError
from erasekit.methods import METHODS, rece, uce
from erasekit.methods.presets import for_model, on_tinyworld
from erasekit.methods import text as _text
from erasekit.testing import FAMILIES, tiny_components, tiny_pipeline

F64 = torch.float64


@pytest.fixture(scope="module")
def pipes():
    return {family: tiny_pipeline(family) for family in FAMILIES}


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def weights(pipe, adapter):
    """module path -> original weight (fp64) for every module of the adapter."""
    return {k: pipe.unet.get_submodule(k.split(".", 1)[1]).weight.detach().to(F64) for k in adapter.deltas}


def dense_uce(W, keys, s_e, s_p, lam):
    """Eq. 7 literally: (λW + s_e Σ v* cᵀ + s_p Σ W c_p c_pᵀ)(λI + s_e Σ c cᵀ + s_p Σ c_p c_pᵀ)⁻¹ − W."""
    c_e, c_g, c_p = (k.to(F64) for k in (keys.erase, keys.guide, keys.preserve))
    v = c_g @ W.T  # (n, out): v*_e = W c_g
    mat1 = lam * W + s_e * v.T @ c_e + s_p * (c_p @ W.T).T @ c_p
    mat2 = lam * torch.eye(W.shape[1], dtype=F64) + s_e * c_e.T @ c_e + s_p * c_p.T @ c_p
    return torch.linalg.solve(mat2.T, mat1.T).T - W


# ------------------------------------------------------------------------------------------------ registry / API
def test_registry_entries_and_configs():
    assert {"uce", "time", "rece"} <= set(METHODS)
    for name, spec in METHODS.items():
        assert spec.name == name and spec.summary and "\n" not in spec.summary
        cls = spec.config_cls
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
        fields = dataclasses.fields(cls)
        assert fields[0].name == "concepts"
        hints = typing.get_type_hints(cls)
        assert hints["concepts"] == tuple[str, ...]
        for f in fields:
            assert f"{f.name}:" in cls.__doc__, f"{name}: field {f.name} undocumented"
            simple = (str, int, float, bool, tuple[str, ...], tuple[int, ...], tuple[float, ...])
            hint = hints[f.name]
            optional = [a for a in typing.get_args(hint) if a is not type(None)] if type(None) in typing.get_args(hint) else []
            assert hint in simple or typing.get_origin(hint) is typing.Literal or (len(optional) == 1 and (
                optional[0] in simple or typing.get_origin(optional[0]) is typing.Literal)), f"{name}.{f.name}: {hint}"
        assert callable(spec.module.erase)
        spec.make_config(("cat",))  # defaults are valid


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="uce", concepts=()), "at least one concept"),
    (dict(method="uce", concepts=("",)), "empty"),
    (dict(method="uce", concepts=("cat", "dog", " cat")), "'cat' is given more than once"),
    (dict(method="uce", concepts=("cat",), lamda=0.3), "lamda.*valid options.*lam"),
    (dict(method="uce", concepts=("cat", "dog", "car"), guides=("a", "b")), "one guide"),
    (dict(method="time", concepts=("cat",), guides=("a", "b")), "one guide"),
    (dict(method="rece", concepts=("cat", "car"), guides=("a", "b", "c")), "one guide"),
    (dict(method="uce", concepts=("cat",), key_mode="all"), "key_mode"),
    (dict(method="uce", concepts=("cat",), lam=0.0), "lam"),
    (dict(method="uce", concepts=("cat",), preserve_scale=-1), "preserve_scale"),
    (dict(method="rece", concepts=("cat",), epochs=1.5), "epochs"),
    (dict(method="rece", concepts=("cat",), validation_judge="q16"), "validation_judge.*tinyworld"),
    (dict(method="rece", concepts=("cat",), validation_seeds=0), "validation_seeds"),
    (dict(method="uce", concepts=("cat",), targets=("attn2.to_nothing",)), "matches no module"),
    (dict(method="uce", concepts=("cat",), targets=("attn1.to_q",)), "not a Linear layer reading"),
    (dict(method="esd-nope", concepts=("cat",)), "unknown method.*uce"),
])
def test_bad_input_raises_config_error(pipes, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        erase(pipes["sd1"], **kwargs)


def test_api_coerces_and_does_not_mutate_pipe(pipes):
    pipe = pipes["sd1"]
    before = {k: v.clone() for k, v in {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}.items()}
    adapter = erase(pipe, "uce", "cat", preserve=["dog"])  # str / list are accepted
    assert adapter.concepts == ("cat",) and adapter.config["preserve"] == ("dog",)
    after = {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert adapter.fingerprint and set(adapter.fingerprint) >= {"unet", "text_encoder"}
    assert all(t.dtype == torch.float32 for d in adapter.deltas.values() for t in (d.down, d.up, d.delta)
               if t is not None)


# ------------------------------------------------------------------------------------------------ text helpers
@pytest.mark.parametrize("family", FAMILIES)
def test_context_matches_pipeline_encode_prompt(pipes, family):
    pipe = pipes[family]
    prompts = ["a cat on grass", "", "photo of a dog by the zebra"]
    ref = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    assert torch.allclose(_text.encode_prompts(pipe, prompts, batch_size=2), ref, atol=1e-6)
    last = _text.tokenize(pipe, prompts).last_index
    assert last.tolist()[1] == 0  # "" -> BOS
    lt = _text.last_token_embeddings(pipe, prompts, batch_size=2)  # causal truncation
    assert torch.allclose(lt, ref[torch.arange(3), last], atol=1e-5)


def test_presets_and_time_alignment(pipes):
    assert _text.expand("Monet", _text.ART_TEMPLATES)[1:3] == ["painting by Monet", "art by Monet"]
    assert _text.expand("cat", _text.OBJECT_TEMPLATES)[-1] == "painting of cat"
    assert _text.time_augment("A rose") == ["A rose", "A photo of a rose", "An image of a rose", "A picture of a rose"]
    pipe = pipes["sd1"]
    tok = pipe.tokenizer
    src, dst = "a pack of roses", "a pack of blue roses"
    idx = _text.align_tokens(pipe, src, dst)
    a, b = tok(src).input_ids, tok(dst).input_ids
    assert len(idx) == 77 and all(b[idx[i]] == a[i] for i in range(len(a)))  # every token to its match
    assert idx[len(a)] == len(b)  # padding follows the EOS positionally
    idx = _text.align_tokens(pipe, "cat", "")  # not a subsequence: BOS, cat -> BOS, EOS -> EOS
    assert idx[:4] == [0, 0, 1, 2]


# ------------------------------------------------------------------------------------------------ UCE math
@pytest.mark.parametrize("family", FAMILIES)
def test_uce_factors_reproduce_dense_solve(pipes, family):
    pipe = pipes[family]
    config = uce.UceConfig(concepts=("cat", "car"), preserve=("dog", "a zebra"), preserve_scale=0.7, lam=0.3)
    adapter = uce.erase(pipe, config)
    keys = uce.collect_keys(pipe, config)
    n = keys.erase.shape[0]
    assert n == 2 and keys.preserve.shape[0] == 2
    assert {k.split(".")[-1] for k in adapter.deltas} == {"to_k", "to_v"}
    names = {n for n, _ in pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}
    assert {k.split(".", 1)[1] for k in adapter.deltas} == names
    for key, W in weights(pipe, adapter).items():
        delta = adapter.deltas[key]
        assert delta.rank is not None and delta.rank <= n  # exact low rank
        dense = delta.dense().to(F64)
        assert torch.linalg.matrix_rank(dense, rtol=1e-5) <= n  # fp32 storage: tolerance above fp32 rounding
        assert rel(dense, dense_uce(W, keys, 1.0, 0.7, 0.3)) < 1e-5


def test_uce_normal_equations_and_lambda_limit(pipes):
    pipe = pipes["sdxl"]
    residuals = []
    for lam in (1.0, 1e-2, 1e-4):
        config = uce.UceConfig(concepts=("cat", "car"), guides=("dog", "zebra"), lam=lam)
        adapter = uce.erase(pipe, config)
        keys = uce.collect_keys(pipe, config)
        c_e, c_g = keys.erase.to(F64), keys.guide.to(F64)
        worst = 0.0
        for key, W in weights(pipe, adapter).items():
            W1 = W + adapter.deltas[key].dense().to(F64)
            # normal equations of Eq. 7: W'(λI + Σ c cᵀ) = λW + Σ v* cᵀ
            lhs = W1 @ (lam * torch.eye(W.shape[1], dtype=F64) + c_e.T @ c_e)
            rhs = lam * W + (c_g @ W.T).T @ c_e
            assert rel(lhs, rhs) < 1e-5
            worst = max(worst, rel(c_e @ W1.T, c_g @ W.T))  # W' c_e vs v*_e
        residuals.append(worst)
    assert residuals[0] > residuals[1] > residuals[2] and residuals[2] < 1e-3


def test_uce_preserve_keys_unchanged(pipes):
    pipe = pipes["sd2"]
    for scale, bound in ((1e4, 1e-3), (0.0, None)):
        config = uce.UceConfig(concepts=("cat",), preserve=("dog", "car"), preserve_scale=scale)
        adapter = uce.erase(pipe, config)
        c_p = uce.collect_keys(pipe, config).preserve.to(F64)
        change = max(rel(c_p @ (W + adapter.deltas[k].dense().to(F64)).T, c_p @ W.T)
                     for k, W in weights(pipe, adapter).items())
        if bound is not None:
            assert change < bound
        else:
            assert change > 1e-2  # without the preserve term these outputs do move


def test_uce_key_modes_and_expansion(pipes):
    pipe = pipes["sd1"]
    keys = uce.collect_keys(pipe, uce.UceConfig(concepts=("cat",), expand_prompts="object", preserve=("dog",)))
    assert keys.erase.shape[0] == 6 and keys.preserve.shape[0] == 6
    config = uce.UceConfig(concepts=("a red cat",), guides=("dog",), key_mode="tokens")
    keys = uce.collect_keys(pipe, config)
    last = _text.tokenize(pipe, ["a red cat", "dog"]).last_index.tolist()
    assert keys.erase.shape[0] == keys.guide.shape[0] == 77 - max(last)
    full = _text.encode_prompts(pipe, ["a red cat"])[0]
    assert torch.allclose(keys.erase[0], full[last[0]])  # starts at the last subject token
    adapter = uce.erase(pipe, config)
    for key, W in weights(pipe, adapter).items():
        assert rel(adapter.deltas[key].dense().to(F64), dense_uce(W, keys, 1.0, 1.0, 0.5)) < 1e-5


def test_preserved_templates_never_name_an_erased_concept():
    """Erasing circle, square, red and striped at once, the preserved siblings' templated forms show no erased
    value (a preserved "a red triangle" would hold what erasing red removes: the 4-concept erasure fell to 47 %)."""
    from erasekit import tinyworld

    concepts = ("circle", "square", "red", "striped")
    config = for_model(uce.UceConfig(concepts=concepts, preserve_related=True, expand_prompts="tinyworld"), True)
    preserve = uce.preserve_prompts(config)
    assert len(preserve) > 500
    erased_words = {w for c in concepts for w in tinyworld.synonyms(c)}
    assert not [p for p in preserve if any(w in p.split() or f" {w}" in p for w in erased_words)]
    # one concept: the templates are the world's own (no attribute drawn there is avoided)
    assert tinyworld.caption_templates("triangle", 64, avoid=("circle",)) == tinyworld.caption_templates("triangle", 64)


def test_preserve_related_adds_the_siblings_on_tinyworld_only(tinyworld_pipe, pipes):
    config = uce.UceConfig(concepts=("disc", "red"), preserve=("a tree", "square"), preserve_related=True,
                           expand_prompts="none")
    preserve = uce.preserve_prompts(for_model(config, on_tinyworld(tinyworld_pipe)))
    assert preserve[:3] == ["a tree", "square", "triangle"]  # the user's first, then siblings, once each
    assert "circle" not in preserve and "red" not in preserve and "blue" in preserve
    assert uce.preserve_prompts(for_model(config, on_tinyworld(pipes["sd1"]))) == ["a tree", "square"]  # not a tinyworld model: as given


def test_a_guide_of_several_prompts_is_the_mean_of_their_keys(pipes):
    """"square | triangle": each erase key is guided by the mean of the two prompts' keys (last_token: the prompts'
    own keys; aligned: each templated prompt's aligned tokens), computed here from single-guide solves."""
    pipe = pipes["sd1"]
    for mode in ("last_token", "aligned"):
        config = dict(concepts=("a red circle",), key_mode=mode, preserve=("a blue star",))
        both = uce.collect_keys(pipe, uce.UceConfig(guides=("a red square | a red triangle",), **config))
        one = [uce.collect_keys(pipe, uce.UceConfig(guides=(g,), **config)) for g in ("a red square", "a red triangle")]
        assert torch.allclose(both.guide, (one[0].guide + one[1].guide) / 2, atol=1e-6), mode
        assert torch.equal(both.erase, one[0].erase) and torch.equal(both.preserve, one[0].preserve)
    with pytest.raises(ConfigError, match="several prompts needs key_mode"):
        uce.collect_keys(pipe, uce.UceConfig(concepts=("cat",), guides=("dog | cow",), key_mode="tokens"))
    for method in ("time", "realera"):
        with pytest.raises(ConfigError, match="guide of several prompts"):
            erase(pipe, method, ["cat"], guides=("dog | cow",))


def test_guide_related_guides_each_concept_to_its_unerased_siblings(tinyworld_pipe, pipes):
    config = uce.UceConfig(concepts=("circle", "square", "red"), guide_related=True)
    guides = for_model(config, on_tinyworld(tinyworld_pipe)).guides
    assert guides == ("triangle | star | cross | diamond",) * 2 + ("green | blue | yellow | purple | orange",)
    assert for_model(config, on_tinyworld(pipes["sd1"])).guides == ("",)  # no vocabulary: as given
    mine = dataclasses.replace(config, guides=("dog",))
    assert for_model(mine, on_tinyworld(tinyworld_pipe)).guides == ("dog",)  # the user's guide wins


def test_guide_choice_nearest_takes_the_closest_prompt(pipes):
    """guide_choice="nearest": each concept's guide of several prompts narrows to the one whose last-subject-token
    vector (the pipeline's own encode_prompt, re-derived here) has the highest cosine with the concept's; its keys are
    then that single guide's; "mean" and single guides are left as given."""
    for family in ("sd1", "sdxl"):
        pipe = pipes[family]
        options = ["a red square", "a blue star", "a photo of a dog"]
        config = uce.UceConfig(concepts=("a red circle", "cat"), guides=(" | ".join(options), "dog"),
                               key_mode="aligned", guide_choice="nearest")

        def vector(prompt):
            ids = pipe.tokenizer(prompt).input_ids
            if family == "sdxl":
                embeds = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                            do_classifier_free_guidance=False)[0]
            else:
                embeds = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
            return embeds[0, len(ids) - 2].double()

        target = vector("a red circle")
        cosines = [float(torch.nn.functional.cosine_similarity(vector(o), target, dim=0)) for o in options]
        assert len(set(cosines)) == len(cosines)
        chosen = uce.choose_guides(pipe, config)
        assert chosen == (options[cosines.index(max(cosines))], "dog"), (family, cosines)
        assert uce.choose_guides(pipe, dataclasses.replace(config, guide_choice="mean")) == config.guides
        adapter = erase(pipe, "uce", config.concepts, guides=config.guides, guide_choice="nearest", save_stats=True)
        assert tuple(adapter.config["guides"]) == chosen  # the adapter records the guide it used
        single = erase(pipe, "uce", config.concepts, guides=chosen, save_stats=True)
        torch.testing.assert_close(adapter.stats["keys.guide"], single.stats["keys.guide"])


def test_tinyworld_preset_guides_to_the_nearest_unerased_sibling(tinyworld_pipe):
    """UCE's and RECE's tinyworld preset: each concept to one sibling not erased (circle → square, or another shape
    while square is erased too), never to an erased concept."""
    from erasekit.tinyworld import related

    for method in ("uce", "rece"):
        alone = erase(tinyworld_pipe, method, ["circle"], **({"epochs": 0, "validation_judge": ""} if method == "rece" else {}))
        assert tuple(alone.config["guides"]) == ("square",)
    concepts = ["circle", "square", "red", "striped"]
    guides = erase(tinyworld_pipe, "uce", concepts).config["guides"]
    assert len(guides) == 4 and all(g in related(c) and g not in concepts for c, g in zip(concepts, guides)), guides


def test_erase_templates_never_name_another_erased_concept():
    """Erasing circle and striped together: none of circle's templated erase prompts names striped (or a synonym),
    whose words there would hold striped's keys; one concept alone keeps every template."""
    from erasekit.tinyworld.world import ATTRIBUTES

    names = ATTRIBUTES["texture"]["striped"]
    pairs = uce.prompt_pairs(("circle", "striped"), ("",), "tinyworld", templated_guides=True)
    circle = [e for e, _ in pairs if "circle" in e]
    assert len(circle) == 1 + len(uce.templates_for("circle", "tinyworld"))
    assert not [e for e in circle if any(n in e.split() for n in names)]
    alone = [e for e, _ in uce.prompt_pairs(("circle",), ("",), "tinyworld", templated_guides=True)]
    assert alone == ["circle"] + [uce._fill(t, "circle") for t in uce.templates_for("circle", "tinyworld")]
    assert any(n in e.split() for e in alone for n in names)  # the case the rule is for


# ------------------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_merge_equals_joint_solve(pipes, family):
    pipe = pipes[family]
    a = erase(pipe, "uce", ["cat"], preserve=("dog",))
    b = erase(pipe, "uce", ["car"], preserve=("a zebra",))
    joint = erase(pipe, "uce", ["cat", "car"], preserve=("dog", "a zebra"))
    merged = uce.merge([a, b], pipe)
    assert merged.concepts == ("cat", "car") and set(merged.deltas) == set(joint.deltas)
    for k in joint.deltas:
        assert rel(merged.deltas[k].dense(), joint.deltas[k].dense()) < 1e-5
    stats = lambda a: uce.statistics(  # noqa: E731
        uce.Keys(a.stats["keys.erase"], a.stats["keys.guide"], a.stats["keys.preserve"]),
        a.stats["weights.erase"], a.stats["weights.preserve"])
    for x, y in zip(stats(merged), stats(joint)):
        assert rel(x, y) < 1e-6


def test_merge_refuses_incompatible(pipes):
    pipe = pipes["sd1"]
    a = erase(pipe, "uce", ["cat"])
    with pytest.raises(ConfigError, match="λ"):
        uce.merge([a, erase(pipe, "uce", ["car"], lam=0.1)], pipe)
    with pytest.raises(ConfigError, match="same modules"):
        uce.merge([a, erase(pipe, "uce", ["car"], targets=("attn2.to_v",))], pipe)
    with pytest.raises(ConfigError, match="statistics"):
        uce.merge([a, erase(pipe, "rece", ["car"], epochs=1)], pipe)
    with pytest.raises(ConfigError, match="base model"):
        uce.merge([a], pipes["sd2"])
    t1, t2 = erase(pipe, "time", ["cat"]), erase(pipe, "time", ["car"], guides=("dog",))
    joint = erase(pipe, "time", ["cat", "car"], guides=("", "dog"))
    merged = uce.merge([t1, t2], pipe)  # TIME adapters merge too
    assert merged.method == "time"
    assert all(rel(merged.deltas[k].dense(), joint.deltas[k].dense()) < 1e-5 for k in joint.deltas)


# ------------------------------------------------------------------------------------------------ TIME / RECE
@pytest.mark.parametrize("family", FAMILIES)
def test_time_and_rece_run_on_each_family(pipes, family):
    pipe = pipes[family]
    linear = {n: m for n, m in pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}
    only_v = {f"unet.{n}" for n in linear if n.endswith("to_v")}
    t = erase(pipe, "time", ["cat"], with_augs=True)
    assert set(t.deltas) == only_v and t.config["lam"] == 0.1
    assert set(erase(pipe, "time", ["cat"], with_to_k=True).deltas) == {f"unet.{n}" for n in linear}
    r = erase(pipe, "rece", ["cat"], epochs=2)
    assert set(r.deltas) == {f"unet.{n}" for n in linear}
    for k, d in {**t.deltas, **r.deltas}.items():
        assert d.weight_shape == tuple(linear[k.split(".", 1)[1]].weight.shape)
        assert torch.isfinite(d.dense()).all()


def test_time_normal_equations(pipes):
    pipe = pipes["sd1"]
    config = METHODS["time"].make_config(["a cat"], guides=("a red cat",), lam=0.1)
    adapter = erase(pipe, "time", ["a cat"], guides=("a red cat",))
    keys = METHODS["time"].module.collect_keys(pipe, config)
    assert keys.erase.shape[0] == 77
    for key, W in weights(pipe, adapter).items():
        assert rel(adapter.deltas[key].dense().to(F64), dense_uce(W, keys, 1.0, 0.0, 0.1)) < 1e-5


def test_rece_adversarial_embedding_property(pipes):
    """c' reproduces the original layers' outputs for the concept on the edited model better than c does."""
    pipe = pipes["sd1"]
    first = erase(pipe, "uce", ["cat"], key_mode="tokens")  # RECE's epoch 0
    W = weights(pipe, first)
    C, D = uce.statistics(uce.Keys(first.stats["keys.erase"], first.stats["keys.guide"], first.stats["keys.preserve"]),
                          1.0, 1.0)
    T = torch.eye(C.shape[0], dtype=F64) + torch.linalg.solve(0.5 * torch.eye(C.shape[0], dtype=F64) + C, D.T).T
    G = sum(w.T @ w for w in W.values())
    c = _text.encode_prompts(pipe, ["cat"])[0].to(F64)  # (77, D)
    c_adv = c @ rece.adversarial_map(G, T, 0.1).T
    edited = {k: w + first.deltas[k].dense().to(F64) for k, w in W.items()}
    for k in W:
        assert torch.allclose(edited[k], W[k] @ T, atol=1e-5)  # W' = W T
    err = lambda x: sum(float(torch.linalg.norm(x @ edited[k].T - c @ W[k].T) ** 2) for k in W)  # noqa: E731
    assert err(c_adv) < 0.5 * err(c)


def test_rece_matches_layerwise_reference(pipes):
    """The text-space RECE equals the reference algorithm run layer by layer on dense weights."""
    pipe = pipes["sd1"]
    config = rece.ReceConfig(concepts=("cat",), preserve=("dog",), epochs=2, reg_scale=0.05)
    adapter = rece.erase(pipe, config)
    W0 = weights(pipe, adapter)
    first = uce.UceConfig(concepts=("cat",), preserve=("dog",), lam=0.5, key_mode="tokens")
    keys0 = uce.collect_keys(pipe, first)
    Wc = {k: w + dense_uce(w, keys0, 1.0, 1.0, 0.5) for k, w in W0.items()}
    emb = _text.encode_prompts(pipe, ["cat", "", "dog"]).to(F64)
    dim = emb.shape[-1]
    for _ in range(2):
        mat1 = 0.05 * torch.eye(dim, dtype=F64) + sum(Wc[k].T @ Wc[k] for k in W0)
        mat2 = sum(Wc[k].T @ W0[k] for k in W0)
        c_adv = emb[0] @ torch.linalg.solve(mat1, mat2).T
        keys = uce.Keys(c_adv, emb[1], emb[2])
        Wc = {k: w + dense_uce(w, keys, 1.0, 0.1, 0.1) for k, w in Wc.items()}
    for k, w in W0.items():
        assert rel(adapter.deltas[k].dense().to(F64), Wc[k] - w) < 1e-5


# ------------------------------------------------------------------------------------------------ full shapes
def test_uce_on_sd15_shapes():
    """SD 1.5's UNet and CLIP ViT-L text encoder (random weights): the math on a few layers of the real sizes.

    The UNet is built on the meta device and materialised with zeros, then only the 32 attn2 k/v weights (the
    only ones UCE reads) get random values: random init of all 860 M parameters costs tens of seconds on CPU."""
    from diffusers import StableDiffusionPipeline

    from erasekit.testing import sd15_text_encoder, sd15_unet

    with torch.device("meta"):
        unet = sd15_unet()
    unet = unet.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".attn2.to_k." in name or ".attn2.to_v." in name:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
            else:
                p.zero_()
    components = tiny_components("sd1")
    components.update(unet=unet, text_encoder=sd15_text_encoder(components["tokenizer"]))
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    config = uce.UceConfig(concepts=("cat", "car"), preserve=("dog", "a zebra", "red circle"))
    adapter = uce.erase(pipe, config)
    assert len(adapter.deltas) == 32 and adapter.info["rank"] == 2
    keys = uce.collect_keys(pipe, config)
    checked = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
               "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v"]
    for key in checked:
        W = pipe.unet.get_submodule(key.split(".", 1)[1]).weight.detach().to(F64)
        delta = adapter.deltas[key]
        assert delta.down.shape == (2, 768) and delta.up.shape == (W.shape[0], 2)
        assert rel(delta.dense().to(F64), dense_uce(W, keys, 1.0, 1.0, 0.5)) < 1e-5


def test_adapter_round_trip(pipes, tmp_path):
    from erasekit.adapter import Adapter

    if not hasattr(Adapter, "save"):
        pytest.skip("Adapter.save not available yet")
    adapter = erase(pipes["sdxl"], "uce", ["cat"])
    loaded = Adapter.load(adapter.save(tmp_path / "cat.uce.safetensors"))
    assert loaded.method == "uce" and set(loaded.stats) == set(uce.STAT_NAMES)
    assert all(torch.equal(loaded.stats[n], adapter.stats[n]) for n in uce.STAT_NAMES)  # exact: merges stay exact
    assert all(torch.equal(loaded.deltas[k].dense(), adapter.deltas[k].dense()) for k in adapter.deltas)


# ------------------------------------------------------------------------------------------ tinyworld (judged)
TW_CONCEPT_PROMPTS = ["a solid red circle on a black background", "a striped blue circle on a white background",
                      "a dotted green circle on a black background", "a picture of a yellow disc",
                      "an outlined purple round shape on a black background", "a solid orange circle"]
TW_OTHER = [("a solid red square on a black background", "square"), ("a striped blue star on a black background", "star"),
            ("a dotted green triangle on a white background", "triangle"), ("a solid yellow cross", "cross"),
            ("an outlined purple diamond on a black background", "diamond"), ("a solid orange square", "square")]


def _judged_shapes(pipe, judge, adapter, prompts, seeds) -> list[str]:
    """The shape the judge sees in each image (prompt-major, then seed) generated with ``adapter`` loaded."""
    from erasekit import compose
    from erasekit.generate import generate

    name = compose.load(pipe, adapter)
    try:
        images = generate(pipe, [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds],
                          output_type="np")
    finally:
        compose.unload(pipe, name)
    return judge(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1).labels("shape")


@pytest.mark.parametrize("method", ["uce", "rece"])
def test_tinyworld_circle_is_gone_and_other_shapes_stay(tinyworld_pipe, judge, method):
    """Judged on tinyworld (the full protocol is benchmarks/closed_form_tinyworld.py): the judge no longer sees a
    circle, synonyms included; the other shapes are still drawn; only cross-attention k/v change."""
    from erasekit import erase

    adapter = erase(tinyworld_pipe, method, ["circle"])
    assert {k.rsplit(".", 1)[-1] for k in adapter.deltas} == {"to_k", "to_v"}
    assert all(".attn2." in k and k.startswith("unet.") for k in adapter.deltas)
    seeds = (0, 1)
    shapes = _judged_shapes(tinyworld_pipe, judge, adapter, TW_CONCEPT_PROMPTS + [p for p, _ in TW_OTHER], seeds)
    n = len(TW_CONCEPT_PROMPTS) * len(seeds)
    assert sum(s == "circle" for s in shapes[:n]) <= 1, shapes[:n]
    expected = [want for _, want in TW_OTHER for _ in seeds]
    assert sum(s == w for s, w in zip(shapes[n:], expected)) >= len(expected) - 1, list(zip(shapes[n:], expected))


def test_rece_keeps_the_epoch_its_validation_judges_best(tinyworld_pipe):
    """The reference's model selection: the earliest epoch with the lowest validation rate is returned, exactly."""
    adapter = erase(tinyworld_pipe, "rece", ["circle"], epochs=2)  # tinyworld preset: validation_judge="tinyworld"
    rates, kept = adapter.info["validation_rates"], adapter.info["kept_epoch"]
    assert len(rates) == 3 and rates[kept] == min(rates) and kept == rates.index(min(rates))
    plain = erase(tinyworld_pipe, "rece", ["circle"], epochs=kept, initial_uce=True, validation_judge="")
    for key, delta in adapter.deltas.items():
        torch.testing.assert_close(delta.dense(), plain.deltas[key].dense(), rtol=1e-5, atol=1e-6)
    assert "validation_rates" not in plain.info


def test_rece_lowers_what_uce_leaves_under_synonyms(tinyworld_pipe, judge):
    """RECE's claim (Gong et al., ECCV 2024): its adversarial epochs erase what the UCE solve it starts from leaves.
    Measured with the papers' replace target (η = 0) and guide ("", not the preset's nearest sibling), under which
    tinyworld's UCE leaves circle in about half of its synonym prompts (with the preset's η = 1 it leaves nothing,
    and RECE keeps that solve: epoch 0)."""
    from erasekit import erase
    from erasekit.tinyworld.eval import standard_grid

    circles = [s for s in standard_grid() if s.shape == "circle"][::3]  # 8 of the grid's 24 circle scenes
    prompts = [s.prompt(names={"shape": word}) for s in circles for word in ("disc", "round shape")]
    seen = {method: _judged_shapes(tinyworld_pipe, judge, erase(tinyworld_pipe, method, ["circle"],
                                                                negative_guidance=0.0, guide_related=False),
                                          prompts, (0,)).count("circle")
            for method in ("uce", "rece")}
    assert seen["uce"] >= 4 and seen["rece"] <= seen["uce"] - 4, seen
