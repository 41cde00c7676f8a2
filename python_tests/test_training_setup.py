"""One optimizer step (accumulation, clipping, lr, EMA), the recipes, and DEKD's settings (per-stage values,
the checks of a request, the matched blocks, what trains), each against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import devit_ext
from devit_ext.dekd import config as K
from devit_ext.dekd.stages import epoch_record
from devit_ext.teacher import build_teacher
from devit_ext.training import recipe as R
from devit_ext.training.dist import Context
from devit_ext.training.stepper import Stepper

torch.set_num_threads(1)


# -- Stepper ---------------------------------------------------------------------------------------------


def _sgd(*values, lr=1.0):
    ps = [torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in values]
    return ps, torch.optim.SGD([{"params": [p]} for p in ps], lr=lr)


def test_stepper_accumulates_the_mean_of_the_micro_batch_gradients():
    (w,), opt = _sgd([1.0, 2.0])
    st = Stepper(opt, ctx=Context(), lr_at=None, clip=0, clip_groups=[[w]], accum_steps=2)
    assert st.backward((w * torch.tensor([1.0, 0.0], dtype=torch.float64)).sum()) is False
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64)) and st.step == 0
    assert st.backward((w * torch.tensor([3.0, 4.0], dtype=torch.float64)).sum()) is True
    assert w.detach().tolist() == [1.0 - 2.0, 2.0 - 2.0]  # lr 1 x mean gradient (2, 2)
    assert w.grad is None and st.step == 1  # zeroed (set to None) after the step
    assert st.backward(w.sum(), last=True) is True  # the end of an epoch steps a partial accumulation
    assert w.detach().tolist() == [-1.0 - 0.5, 0.0 - 0.5] and st.step == 2


def test_stepper_sets_each_steps_lr_and_steps_the_scheduler_and_ema():
    (w, v), opt = _sgd([0.0], [0.0])
    calls = []

    class Sched:
        def step(self):
            calls.append("sched")

    class Ema:
        def update(self, module, step):
            calls.append(("ema", module, step))

    src = torch.nn.Linear(1, 1)
    st = Stepper(opt, ctx=Context(), lr_at=lambda k: [0.5, 0.25][k - 3], clip=0.0, clip_groups=[], ema=Ema(),
                 ema_source=src, sched=Sched(), step=3)
    st.backward((w + v).sum())
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5] and w.item() == -0.5 and v.item() == -0.5
    st.backward((w + v).sum())
    assert w.item() == -0.75 and st.step == 5
    assert calls == ["sched", ("ema", src, 4), "sched", ("ema", src, 5)]


def test_stepper_clips_each_clip_group_to_its_own_norm():
    (a, b, c), opt = _sgd([0.0, 0.0], [0.0], [0.0])
    st = Stepper(opt, ctx=Context(), lr_at=None, clip=1.0, clip_groups=[[a], [b, c]])
    st.backward((a * torch.tensor([3.0, 4.0], dtype=torch.float64)).sum() + 0.3 * b.sum() + 0.4 * c.sum())
    assert a.detach().tolist() == pytest.approx([-0.6, -0.8])  # norm 5 -> 1
    assert b.item() == pytest.approx(-0.3) and c.item() == pytest.approx(-0.4)  # norm 0.5: under the clip
    (x,), opt2 = _sgd([0.0, 0.0])
    none = Stepper(opt2, ctx=Context(), lr_at=None, clip=None, clip_groups=[[x]])
    none.backward((x * torch.tensor([3.0, 4.0], dtype=torch.float64)).sum())
    assert x.detach().tolist() == [-3.0, -4.0]  # clip None/0: no clipping


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_stepper_stops_on_a_non_finite_loss_before_any_gradient(bad):
    (w,), opt = _sgd([1.0])
    st = Stepper(opt, ctx=Context(), lr_at=None, clip=0, clip_groups=[[w]])
    with pytest.raises(FloatingPointError) as e:
        st.backward(w.sum() * bad, where="stage x batch 3")
    assert str(e.value) == (f"stage x batch 3: the loss is {bad}; training stopped before this update (the last "
                            "checkpoint, from the end of the previous epoch, is kept). Lower the lr, check the "
                            "data, or use clip")
    assert w.grad is None and w.item() == 1.0 and st.step == 0
    with pytest.raises(FloatingPointError, match=f"^: the loss is {bad};"):  # no `where`: nothing before it
        st.backward(w.sum() * bad)


def test_stepper_averages_every_optimizer_parameter_over_the_processes_each_step():
    class Ctx:  # a 2-process context that records what it is asked to average
        def __init__(self):
            self.seen = []

        def average_grads(self, params):
            self.seen.append([id(p) for p in params])

    (a, b), opt = _sgd([1.0], [2.0])
    ctx = Ctx()
    st = Stepper(opt, ctx=ctx, lr_at=None, clip=0, clip_groups=[], accum_steps=2)
    steps = [st.backward((a + b).sum()) for _ in range(4)]
    assert steps == [False, True, False, True]  # the accumulation restarts after each step
    assert ctx.seen == [[id(a), id(b)]] * 2


# -- recipes -------------------------------------------------------------------------------------------------


def test_recipe_fields_bounds_and_lr_rule():
    assert R.Recipe("a", mixup=0.1).mixes and R.Recipe("a", cutmix=0.1).mixes and not R.Recipe("a").mixes
    assert R.Recipe("a", lr_per_512=True).lr(1.0, 256) == 0.5 and R.Recipe("a").lr(1.0, 256) == 1.0
    assert R.RECIPES["light"].settings() == dict(name="light", mixup=0.0, cutmix=0.0, label_smoothing=0.0,
                                                 ema_decay=0.0, accum_steps=1, lr_per_512=False)
    mine = R.Recipe("mine", mixup=0.2)
    assert R.resolve(mine) == mine and R.resolve(mine, cutmix=None, accum_steps=3).accum_steps == 3
    assert R.resolve("deit", label_smoothing=None).label_smoothing == 0.1
    ok = R.resolve("light", mixup=0.0, cutmix=2.0, ema_decay=0.999, label_smoothing=0.0, accum_steps=1)
    assert (ok.mixup, ok.cutmix, ok.ema_decay, ok.label_smoothing, ok.accum_steps) == (0.0, 2.0, 0.999, 0.0, 1)
    for field, v, msg in [("mixup", -0.1, "mixup: expected >= 0, got -0.1"),
                          ("cutmix", -1.0, "cutmix: expected >= 0, got -1.0"),
                          ("ema_decay", 1.0, "ema_decay: expected [0, 1), got 1.0"),
                          ("ema_decay", -0.5, "ema_decay: expected [0, 1), got -0.5"),
                          ("label_smoothing", 1.0, "label_smoothing: expected [0, 1), got 1.0"),
                          ("label_smoothing", -0.1, "label_smoothing: expected [0, 1), got -0.1"),
                          ("accum_steps", 0, "accum_steps: expected >= 1, got 0")]:
        with pytest.raises(ValueError) as e:
            R.resolve("light", **{field: v})
        assert str(e.value) == msg
    with pytest.raises(ValueError) as e:
        R.resolve("imagenet")
    assert str(e.value) == "recipe: expected one of ['deit', 'light'] or a devit_ext Recipe, got 'imagenet'"


def test_mixup_ema_and_label_loss_carry_the_recipe():
    assert R.make_mixup(R.resolve("light"), 5) is None and R.make_ema(R.resolve("light"), torch.nn.Linear(1, 1)) is None
    mix = R.make_mixup(R.Recipe("m", mixup=0.3, cutmix=0.7, label_smoothing=0.2), 5)
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.label_smoothing, mix.num_classes) == (0.3, 0.7, 0.2, 5)
    ema = R.make_ema(R.Recipe("e", ema_decay=0.9), torch.nn.Linear(1, 1))
    assert ema.decay == 0.9 and ema.use_warmup is True
    z = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    y = torch.tensor([1, 0])
    smooth = F.one_hot(y, 3).float() * 0.7 + 0.1  # smoothing 0.3 over 3 classes
    want = float((-smooth * z.log_softmax(-1)).sum(-1).mean())
    assert float(R.label_loss(z, y, 0.3)) == pytest.approx(want, rel=1e-6)
    assert float(R.label_loss(z, y)) == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-6)  # default: none
    soft = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])  # Mixup's targets carry their own smoothing
    want = float((-soft * z.log_softmax(-1)).sum(-1).mean())
    assert float(R.label_loss(z, soft, 0.3)) == pytest.approx(want, rel=1e-6)


# -- DEKD settings ---------------------------------------------------------------------------------------


def test_per_stage_reads_one_value_a_pair_or_a_dict():
    d = {"distill": 1, "ensemble": 2}
    got = K.per_stage("lr", None, d, int)
    assert got == d and got is not d
    assert K.per_stage("lr", 5, d, lambda v: v * 10) == {"distill": 50, "ensemble": 50}
    assert K.per_stage("lr", (3, 4), d, lambda v: -v) == {"distill": -3, "ensemble": -4}
    assert K.per_stage("lr", [3, 4], d, int) == {"distill": 3, "ensemble": 4}
    assert K.per_stage("lr", {"ensemble": 7}, d, lambda v: v + 1) == {"distill": 1, "ensemble": 8}
    assert d == {"distill": 1, "ensemble": 2}
    with pytest.raises(ValueError) as e:
        K.per_stage("lr", {"distil": 1, "zz": 2}, d, int)
    assert str(e.value) == "lr: unknown stage(s) ['distil', 'zz']; stages are ['distill', 'ensemble']"
    with pytest.raises(ValueError) as e:
        K.per_stage("epochs", (1, 2, 3), d, int)
    assert str(e.value) == "epochs: expected one value or (distill, ensemble), got (1, 2, 3)"


@pytest.fixture(scope="module")
def pair():
    t = build_teacher(img_size=16, patch_size=4, in_chans=1, num_classes=6, embed_dim=32, depth=4, num_heads=2,
                      mlp_ratio=2.0, seed=0).eval()
    return t, devit_ext.decompose(t, 2, seed=0)


def test_relation_pairs_middle_none_and_explicit_with_negative_indices(pair):
    teacher, model = pair
    ds = [len(m.blocks) for m in model.submodels]
    mid = [[(max(0, d // 2 - 1), 1)] for d in ds]  # block L/2 - 1 of a 4-block teacher is 1
    assert K.relation_pairs("middle", model, teacher) == mid
    for none in (None, "none", ()):
        assert K.relation_pairs(none, model, teacher) == [[], []]
    assert K.relation_pairs([(0, -1), (-1, 2)], model, teacher) == [[(0, 3), (d - 1, 2)] for d in ds]
    with pytest.raises(ValueError) as e:
        K.relation_pairs([(ds[0], 0)], model, teacher)
    assert str(e.value) == (f"relation_layers: pair ({ds[0]}, 0) out of range for device 0 ({ds[0]} blocks) "
                            "and the teacher (4 blocks)")
    with pytest.raises(ValueError, match=r"relation_layers: pair \(0, 4\) out of range"):
        K.relation_pairs([(0, 4)], model, teacher)
    assert K.relation_pairs([(0, 0)], model, teacher) == [[(0, 0)], [(0, 0)]]  # block 0 of both is valid
    for bad in ("first", [(0,)], [("a", 1)]):
        with pytest.raises(ValueError, match="relation_layers: expected 'middle', None or a list"):
            K.relation_pairs(bad, model, teacher)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_set_trainable_freezes_what_each_stage_does_not_train(pair):
    _, model = pair
    names = {n for n, _ in model.named_parameters()}
    fusion = {n for n in names if n.startswith("fusion.")}
    heads = {n for n in names if n.startswith("submodels.") and (".head." in n or ".head_dist." in n)}
    subs = {n for n in names if n.startswith("submodels.")}
    assert fusion and heads and subs - heads
    model.requires_grad_(False)
    K.set_trainable(model, "distill", freeze=False)
    assert _trainable(model) == names - fusion
    K.set_trainable(model, "distill", freeze=True)  # freeze is for the ensemble stage only
    assert _trainable(model) == names - fusion
    K.set_trainable(model, "ensemble", freeze=False)
    assert _trainable(model) == names - heads
    K.set_trainable(model, "ensemble", freeze=True)
    assert _trainable(model) == fusion
    model.requires_grad_(True)


def test_check_setup_returns_the_teacher_config_and_the_stages(pair):
    teacher, model = pair
    tcfg, stages = K.check_setup(model, teacher, ["distill", "ensemble"], "finetune", 0.0, 1.0, [0, 0, 0])
    assert stages == ("distill", "ensemble") and tcfg["num_classes"] == 6 and tcfg["in_chans"] == 1
    assert K.check_setup(model, teacher, ("ensemble",), "restricted", 0.99, 0.0, (1, 2, 3))[1] == ("ensemble",)
    for kw, msg in [(dict(stages=()), "stages: expected a non-empty subset"),
                    (dict(stages=("distill", "distill")), "stages: expected a non-empty subset"),
                    (dict(stages=("train",)), "stages: expected a non-empty subset"),
                    (dict(stages=("ensemble", "distill")), "stages: must run in the order"),
                    (dict(subtask_teachers="all"), "subtask_teachers: expected 'restricted' or 'finetune', got 'all'"),
                    (dict(device_dropout=1.0), "device_dropout: expected a number >= 0 and < 1"),
                    (dict(alpha=1.5), "alpha: expected a number >= 0 and <= 1"),
                    (dict(relation_weights="abc"), "relation_weights: expected (g_Q, g_K, g_V), got 'abc'"),
                    (dict(relation_weights=(1, 2)), "relation_weights: expected (g_Q, g_K, g_V)")]:
        args = dict(stages=("distill",), subtask_teachers="restricted", device_dropout=0.0, alpha=0.5,
                    relation_weights=(0.2, 0.1, 0.3)) | kw
        with pytest.raises(ValueError) as e:
            K.check_setup(model, teacher, args["stages"], args["subtask_teachers"], args["device_dropout"],
                          args["alpha"], args["relation_weights"])
        assert str(e.value).startswith(msg), (kw, str(e.value))
    with pytest.raises(TypeError) as e:
        K.check_setup(teacher, teacher, ("distill",), "restricted", 0.0, 0.5, (0.2, 0.1, 0.3))
    assert str(e.value) == "model: expected a devit_ext.DeViT (from devit_ext.decompose), got VisionTransformer"


def test_check_setup_refuses_a_teacher_the_model_was_not_decomposed_from(pair):
    teacher, model = pair
    ok = ("distill",), "restricted", 0.0, 0.5, (0.2, 0.1, 0.3)
    kw = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, seed=0)
    wide = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(16, 8), in_chans=1, num_classes=6,
                             **{k: v for k, v in kw.items() if k != "seed"})
    for m, other, msg in [
        (model, build_teacher(img_size=16, in_chans=1, num_classes=5, **kw),
         "teacher: has 5 classes but model has 6; decompose this teacher, or pass the teacher the model was "
         "decomposed from"),
        (model, wide, "teacher: takes 1x16x8 images but the model takes 1x16x16"),
        (devit_ext.decompose(wide, 2, seed=0), teacher, "teacher: takes 1x16x16 images but the model takes 1x16x8"),
        (model, build_teacher(img_size=16, in_chans=3, num_classes=6, **kw),
         "teacher: takes 3x16x16 images but the model takes 1x16x16"),
        (model, build_teacher(img_size=16, in_chans=1, num_classes=6, distilled=True, **kw),
         "teacher: distilled=True but model.distilled=False; a DeiT-distilled teacher needs a model decomposed "
         "from it (two tokens per device)")]:
        with pytest.raises(ValueError) as e:
            K.check_setup(m, other, *ok)
        assert str(e.value) == msg
    groups = model.class_groups
    try:
        for bad in ([[0, 1, 2], [3, 4, 4]], [[0, 1, 2, 3, 4, 5], []]):
            model.class_groups = bad
            with pytest.raises(ValueError) as e:
                K.check_setup(model, teacher, *ok)
            assert str(e.value) == "model: class_groups must be non-empty, disjoint and cover 0..num_classes-1"
    finally:
        model.class_groups = groups


def test_epoch_record_divides_the_sums_by_the_samples_seen():
    rec = epoch_record(Context(), {"loss": 6.0, "ce": 3.0, "correct": 2.0, "seen": 4.0})
    assert rec == {"loss": 1.5, "ce": 0.75, "train_acc": 0.5}
    assert epoch_record(Context(), {"loss": 0.0, "correct": 0.0, "seen": 0.0}) == {"loss": 0.0, "train_acc": 0.0}
    assert epoch_record(Context(), {"loss": 1.0, "correct": 0.0, "seen": 0.5}) == {"loss": 1.0, "train_acc": 0.0}
