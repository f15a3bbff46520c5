"""Class-conditional flow maps: TwoTimeDiT, FlowMap labels, labelled consistency distillation, bind_labels."""
import pytest
import torch

from diffusion_lab import VPLinear
from diffusion_lab import training as T
from diffusion_lab.flowmap import ConsistencyTrainer, FlowMap, TwoTimeDiT, flow_map_sample, teacher_step
from diffusion_lab.guidance import bind_labels, classifier_free_guidance
from diffusion_lab.models import get_model
from diffusion_lab.targets import ring8

SD = 0.5


def _teacher(seed=0):
    """A DiT-micro/2 with every zero-initialised layer perturbed, so that its output depends on x, t and y."""
    torch.manual_seed(seed)
    net = get_model("DiT-micro/2", num_classes=10)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
    return net.eval()


def _x(n=6, seed=1):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_from_dit_starts_as_the_teachers_ddim_step():
    sch, net = VPLinear(), _teacher()
    field = T.learned_field(net, sch, "edm", sigma_data=SD)
    psi = FlowMap(TwoTimeDiT.from_dit(net), sch, SD)
    x, y = _x(), torch.tensor([0, 1, 2, 3, 9, 5])
    s, t = torch.tensor([0.9, 0.5, 0.3, 0.99, 0.2, 0.7], dtype=torch.float64), \
        torch.tensor([0.1, 0.5, 0.01, 0.4, 0.001, 0.69], dtype=torch.float64)
    got = psi(x, s, t, y)
    want = teacher_step(bind_labels(field, y), x.double(), s, t, "ddim").float()
    # the same float32 network on the same inputs: round-off of the float32 forward pass only
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), float((got - want).abs().max())
    # the teacher is not shared: training the student leaves it alone
    assert psi.net.dit is not net


def test_boundary_labels_and_no_label_dropout():
    sch, net = VPLinear(), _teacher()
    core = TwoTimeDiT.from_dit(net)
    with torch.no_grad():
        core.emb_t.mlp[2].weight.normal_(0, 0.1)  # make t matter
    psi = FlowMap(core, sch, SD)
    x = _x()
    t = torch.rand(6, dtype=torch.float64) * 0.9 + 0.05
    assert torch.equal(psi(x, t, t, 3), x)  # Psi(x, t, t) = x exactly, for any labels
    a, b = psi(x, 0.8, 0.2, 3), psi(x, 0.8, 0.2, 4)
    assert (a - b).abs().max() > 1e-3  # labels reach the network
    assert (psi(x, 0.8, 0.2, 3) - psi(x, 0.8, 0.3, 3)).abs().max() > 1e-4  # so does the end time
    core.train()  # train mode: the DiT would drop 10 % of labels; a flow map never does
    outs = [psi(x, 0.8, 0.2, torch.full((6,), 3)) for _ in range(5)]
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert torch.equal(psi.with_labels(3)(x, 0.8, 0.2), outs[0])  # bound labels = passed labels
    null = psi(x, 0.8, 0.2)  # no labels: the null class
    assert torch.equal(null, psi(x, 0.8, 0.2, 10))


def test_two_time_dit_refuses_vector_free_conditioning():
    net = get_model("DiT-micro/2", num_classes=10, conditioning="in-context")
    with pytest.raises(ValueError, match="adaLN"):
        TwoTimeDiT(net)
    with pytest.raises(TypeError, match="DiT"):
        TwoTimeDiT(torch.nn.Linear(2, 2))


def test_bind_labels_guided_and_learned():
    sch, net = VPLinear(), _teacher()
    field = T.learned_field(net, sch, "edm", sigma_data=SD)
    x, y = _x(4).double(), torch.tensor([1, 2, 3, 4])
    bound = bind_labels(field, y)
    assert torch.equal(bound.x0_eps(x, 0.5)[0], T.learned_field(net, sch, "edm", sigma_data=SD, labels=y).x0_eps(x, 0.5)[0])
    assert bound.nfe == 1 and field.nfe == 0 and field.model.labels is None
    cfg = classifier_free_guidance(field, 1.5, 0)
    want = classifier_free_guidance(field, 1.5, y).x0_eps(x, 0.5)[0]
    assert torch.equal(bind_labels(cfg, y).x0_eps(x, 0.5)[0], want)
    with pytest.raises(TypeError, match="cannot bind class labels"):
        bind_labels(ring8().field(sch), 1)


def test_labelled_distillation_resumes_bitwise_and_counts_the_teacher():
    sch, net = VPLinear(), _teacher()
    data = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.5
    labels = torch.arange(40) % 10
    field = T.learned_field(net, sch, "edm", sigma_data=SD)

    def trainer():
        torch.manual_seed(0)
        return ConsistencyTrainer(FlowMap(TwoTimeDiT.from_dit(net), sch, SD), field, data, labels=labels,
                                  method="ctm", batch=8, grid_steps=6, log_every=2)

    a = trainer()
    a.run(6)
    b = trainer()
    b.run(3)
    state = b.state_dict()
    c = trainer()
    c.load_state_dict(state)
    c.run(6)
    for (k, p), q in zip(a.psi.net.state_dict().items(), c.psi.net.state_dict().values()):
        assert torch.equal(p, q), k
    assert a.teacher_calls == 6 * 2  # Heun: two teacher calls per step
    assert a.settings()["conditional"] is True
    # the student moved away from its initialisation in the conditioning of the end time
    assert a.psi.net.emb_t.mlp[2].weight.abs().max() > 0
    x = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    r = flow_map_sample(a.flow_map(), x, steps=2, labels=torch.arange(10))
    assert r.nfe == 2 and torch.isfinite(r.x).all()


def test_labels_are_checked():
    sch, net = VPLinear(), _teacher()
    data = torch.zeros(10, 1, 8, 8)
    field = T.learned_field(net, sch, "edm", sigma_data=SD)
    psi = FlowMap(TwoTimeDiT.from_dit(net), sch, SD)
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        ConsistencyTrainer(psi, field, data, labels=torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        ConsistencyTrainer(psi, field, data, labels=torch.zeros(10))
    with pytest.raises(ValueError, match="labels"):
        psi(data[:3], 0.5, 0.1, torch.tensor([0, 1]))


def test_digits_flow_map_quick(tmp_path):
    import csv

    from experiments import digits_flow_map

    digits_flow_map.main(["--quick", "--out", str(tmp_path), "--methods", "cd ctm"])
    rows = list(csv.DictReader(open(tmp_path / "digits_flow_map.csv")))
    nfe = {(r["model"], r["sampler"]): int(r["nfe"]) for r in rows}
    # exact NFE: 30 dpmpp_2m steps + one denoising call; the maps spend exactly their calls
    assert nfe[("teacher", "dpmpp_2m 30 steps + denoise")] == 31
    assert nfe[("cd map", "1 call")] == 1 and nfe[("cd map", "2 calls, re-noised (Alg. 1)")] == 2
    assert nfe[("ctm map", "2 calls, chain")] == 2
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and float(r["frechet"]) >= 0.0 for r in rows)
    assert (tmp_path / "digits_flow_map.json").exists() and (tmp_path / "digits_flow_map.png").exists()
