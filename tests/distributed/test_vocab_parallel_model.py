"""``parallelize_vocab`` on a whole pretraining model, 2 spawned gloo ranks (vocab-parallel 2) vs the unsplit
model in the same process, one batch, fp32, dropout 0, a padded vocabulary (real 1000 < padded 1024).

Must hold within 1e-6: MLM and pair loss sums, target / correct counts, and every gradient — replicated
parameters equal on each rank, sharded ones (word embedding = tied decoder weight, decoder bias) equal
to the reference's rows once gathered in rank order, zero on padded rows. Also: the same parameter names
as the unsplit model, ``tensor_model_parallel`` on exactly the sharded tensors, the checkpoint layout
record, and ``Topology.mpu()``. The ELECTRA model too (its generator's decoder split, the samples drawn over
both slices): the same samples, hence the same replaced tokens, losses and gradients.

A failure points at megamlm/parallel/vocab.py (parallelize_vocab: the slicing, the re-tie, the group),
at megamlm/parallel/layers.py (the decoder's copy-to-region — without it the replicated layers get a
partial gradient — or the −inf padded columns) or at megamlm/distributed/topology.py (mpu).
"""

import torch

from tests._spawn import spawn

REAL, PADDED, H = 1000, 1024, 32


def _model(seed: int = 0, objective: str = "mlm"):
    from megamlm.config import ModelConfig, ObjectiveConfig
    from megamlm.model.pretraining import build_model

    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=H, num_layers=2, num_heads=4, ffn_size=64, max_position_embeddings=32,
                      dropout=0.0, attention_dropout=0.0)
    oc = ObjectiveConfig(pair="nsp") if objective == "mlm" else ObjectiveConfig(name="electra", pair="none",
                                                                                 generator_heads=2, generator_layers=1)
    model = build_model(cfg, oc, PADDED, REAL)
    with torch.no_grad():  # non-zero biases and norms so every tensor matters
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _batch():
    from megamlm.bench import random_batch

    b = random_batch(4, 32, REAL, padding=True, seed=3)
    b.mlm_targets[:4] = torch.tensor([511, 512, REAL - 1, 0])  # both sides of the slice boundary, the last real id
    return b


def _loss(model, batch):
    from megamlm.objectives import step_denominators, weighted_sum

    torch.manual_seed(5)  # ELECTRA's samples: the same noise on every rank and in the reference
    terms = model(batch)
    loss = weighted_sum(terms, step_denominators(batch.n_targets, batch.pair_labels.numel(), batch.n_tokens),
                        {"disc": 50.0})
    loss.backward()
    return terms


def _worker(rank: int, world: int) -> list[float]:
    from megamlm.distributed.topology import build_topology

    topo = build_topology(vp_size=2)
    assert (topo.vp_size, topo.dp_size, topo.vp_rank) == (2, 1, rank)
    mpu = topo.mpu()
    methods = {m for m in dir(mpu) if m.startswith(("get_", "initialize"))}
    assert methods == {f"get_{k}_parallel_{x}" for k in ("model", "tensor_model", "data")
                       for x in ("rank", "world_size", "group")}, methods
    assert (mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()) == (rank, 2)
    assert (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()) == (0, 1)
    assert mpu.get_tensor_model_parallel_group() is topo.vp_group and mpu.get_data_parallel_group() is topo.dp_group
    assert build_topology(vp_size=1).mpu() is None

    return [_check(objective, topo, rank) for objective in ("mlm", "electra")]


def _check(objective: str, topo, rank: int) -> float:
    """The vocab-parallel model of ``objective`` against the unsplit one: losses, counts (ELECTRA: the same
    samples, so the same replaced tokens), gradients; the largest gradient difference."""
    from megamlm.parallel.layers import (VOCAB_SHARDED_PARAMS, VOCAB_TIED_PARAMS, parallelize_vocab,
                                        vocab_parallel_layout)

    batch = _batch()
    ref = _model(objective=objective)
    ref_terms = _loss(ref, batch)
    model = parallelize_vocab(_model(objective=objective), topo)
    assert model.vocab_group is topo.vp_group and model.encoder.vocab_size == PADDED
    assert model.real_vocab_size == REAL
    terms = _loss(model, batch)

    for k in ref_terms.loss_sum:
        torch.testing.assert_close(terms.loss_sum[k].detach(), ref_terms.loss_sum[k].detach(), atol=1e-6, rtol=1e-6)
        assert int(terms.n_targets[k]) == int(ref_terms.n_targets[k])
        assert int(terms.n_correct[k]) == int(ref_terms.n_correct[k]), k
    assert {k: int(v) for k, v in terms.counts.items()} == {k: int(v) for k, v in ref_terms.counts.items()}
    if objective == "electra":
        assert int(terms.counts["disc_replaced"]) > 0
        assert vocab_parallel_layout(model, topo.vp_size)["sharded"] == {
            "encoder.embeddings.word_embeddings.weight": 0, "generator.mlm_head.decoder.bias": 0}
        return _compare_grads(model, ref, topo, VOCAB_SHARDED_PARAMS, VOCAB_TIED_PARAMS)

    local_logits, _ = model.logits(batch)
    assert local_logits.shape == (batch.n_targets, PADDED // 2)
    if rank == 1:  # ids 1000..1023 are padding: −inf, never predicted
        assert torch.all(local_logits[:, REAL - PADDED // 2:] == float("-inf"))

    worst = _compare_grads(model, ref, topo, VOCAB_SHARDED_PARAMS, VOCAB_TIED_PARAMS)
    layout = vocab_parallel_layout(model, topo.vp_size)
    assert layout == {"vocab_parallel_size": 2, "padded_vocab_size": PADDED, "real_vocab_size": REAL,
                      "sharded": {"encoder.embeddings.word_embeddings.weight": 0, "mlm_head.decoder.bias": 0}}
    return worst


def _compare_grads(model, ref, topo, sharded_params, tied_params) -> float:
    import torch.distributed as dist

    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    params = dict(model.named_parameters(remove_duplicate=False))
    assert set(params) == set(ref_params)
    assert set(model.state_dict()) == set(ref.state_dict())
    for alias, source in tied_params.items():
        if alias in params:
            assert params[alias] is params[source]
    worst = 0.0
    for name, p in params.items():
        sharded = tied_params.get(name, name) in sharded_params
        assert getattr(p, "tensor_model_parallel", False) == sharded, name
        grad = p.grad
        if sharded:
            assert p.shape[0] == PADDED // 2
            parts = [torch.empty_like(p.grad) for _ in range(2)]
            dist.all_gather(parts, p.grad.contiguous(), group=topo.vp_group)
            grad = torch.cat(parts)
            weight = [torch.empty_like(p) for _ in range(2)]
            dist.all_gather(weight, p.detach().contiguous(), group=topo.vp_group)
            assert torch.equal(torch.cat(weight), ref_params[name].detach()), f"{name}: not a slice of the t=1 init"
            assert torch.all(grad[REAL:] == 0), f"{name}: a padded row got a gradient"
        torch.testing.assert_close(grad, ref_params[name].grad, atol=1e-6, rtol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        worst = max(worst, float((grad - ref_params[name].grad).abs().max()))
    return worst


def test_parallelize_vocab_matches_the_unsplit_model():
    """BERT (MLM + NSP) and ELECTRA (the generator's decoder split; its samples drawn over the two slices)."""
    worst = spawn(_worker, world_size=2)
    assert max(max(w) for w in worst) <= 1e-6


def test_parallelize_vocab_is_a_no_op_without_vocab_parallelism():
    from megamlm.distributed.topology import single_process_topology
    from megamlm.parallel.layers import parallelize_vocab, vocab_parallel_layout

    model = _model()
    emb = model.encoder.embeddings.word_embeddings
    assert parallelize_vocab(model, single_process_topology()) is model
    assert model.encoder.embeddings.word_embeddings is emb and model.vocab_group is None
    assert single_process_topology().mpu() is None
    assert vocab_parallel_layout(model, 1)["vocab_parallel_size"] == 1
