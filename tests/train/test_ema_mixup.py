"""Weight averaging (--ema) and mixup / CutMix: the saved model is the average, and an interrupted
live-augmented run resumed from its checkpoint ends with exactly the weights of an uninterrupted one."""

import pytest
import torch
from safetensors.torch import load_file

import train.checkpoint as ckpt
import train.loop as loop
from train.models import ModelConfig


def _configs(root):
    mc = ModelConfig(image_size=96, d_model=32, heads=2, global_head=True)
    tc = loop.TrainConfig(data=str(root), epochs=2, limit_per_class=2, limit_val=16, freeze_blocks=0,
                          threads=1, ema=0.9, mixup=0.4, cutmix=1.0)
    return mc, tc


@pytest.mark.slow
def test_ema_mixup_run_resumes_bit_exactly_and_saves_the_average(tmp_path, grocery_root, monkeypatch):
    mc, tc = _configs(grocery_root)
    torch.set_num_threads(2)
    loop.train_model(mc, tc, tmp_path / "straight", log=lambda *a: None)
    assert torch.get_num_threads() == 2  # threads=1 held for that run only

    real_save = ckpt.save_training_state

    def save_then_die(out, model, opt, sched, epoch, history, ema=None):
        real_save(out, model, opt, sched, epoch, history, ema=ema)
        if epoch == 0:
            raise KeyboardInterrupt("simulated kill after the first checkpoint")

    monkeypatch.setattr(ckpt, "save_training_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        loop.train_model(mc, tc, tmp_path / "resumed", log=lambda *a: None)
    monkeypatch.setattr(ckpt, "save_training_state", real_save)
    loop.train_model(mc, tc, tmp_path / "resumed", resume=True, log=lambda *a: None)

    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    last = tmp_path / "straight" / "checkpoint" / "epoch-0001"
    live, avg = load_file(str(last / "model.safetensors")), load_file(str(last / "ema.safetensors"))
    trained = [k for k in avg if k.startswith("head.") and not torch.equal(live[k], avg[k])]
    assert trained, "the average never moved away from the live weights"
    for k in avg:
        assert torch.equal(a[k], avg[k]), f"saved {k} is not the weight average"


def test_mixup_with_distillation_mixes_the_teacher_targets_with_the_labels(tmp_path):
    """Mixup mixes the losses of the two images of a pair; under distillation the teacher's targets of
    the partner image must travel with the partner's label, or the student learns one image's label
    and another's teacher distribution."""
    from train.losses import _LOSSES, register_loss

    seen = []

    @register_loss("_probe_pairs")
    def probe(ctx):  # record which image each row's teacher target came from, next to its label
        seen.append((ctx.labels.clone(), ctx.aux["teacher"]["logps"][0][:, 0].long().clone()))
        return ctx.logps[-1].sum() * 0.0

    try:
        mc = ModelConfig(image_size=64, d_model=32, heads=2)
        tc = loop.TrainConfig(data="synthetic", epochs=1, mixup=0.4, limit_per_class=2, cache_views=1,
                              freeze_blocks=11, losses="ce,_probe_pairs", threads=1)

        def teacher(batch):  # every level's row i holds the image index i: traceable after mixing
            return {"logps": [batch.idx.float()[:, None].expand(-1, 3) for _ in range(3)], "temperature": 1.0}

        loop.train_model(mc, tc, tmp_path / "x", log=lambda *a: None, teacher=teacher)
    finally:
        _LOSSES._items.pop("_probe_pairs", None)
    assert seen and len(seen) % 2 == 0
    mixed = 0
    for (ya, ia), (yb, ib) in zip(seen[0::2], seen[1::2]):
        pair = [ia.tolist().index(j) for j in ib.tolist()]  # how the partner rows were drawn
        assert torch.equal(yb, ya[pair]), "partner labels and partner teacher targets come from different images"
        mixed += int(pair != list(range(len(pair))))
    assert mixed > 0, "no step mixed two different images"


def test_ema_decay_warms_up_so_the_random_init_leaves_the_average():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    init = model.weight.detach().clone()
    ema = loop.WeightEMA(model, decay=0.998)
    assert ema.current_decay() == pytest.approx(0.1)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    # first step: decay 1/10, so the average is 90 % the new weights, not 0.2 %
    torch.testing.assert_close(ema.shadow["weight"], init + 0.9)
    for _ in range(1000):
        ema.update(model)
    # after 1,000 steps of constant weights the init is gone; without warm-up 0.998**1000 = 13.5 % would remain
    torch.testing.assert_close(ema.shadow["weight"], init + 1.0)
    assert ema.updates == 1001 and ema.current_decay() == pytest.approx(1002 / 1011)
    ema.updates = 10_000  # long runs reach the configured decay
    assert ema.current_decay() == pytest.approx(0.998)
