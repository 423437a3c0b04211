import torch

from speedrun.train.loop import EVENTS, FitState, StopFit, fit


class ListLoader:
    def __init__(self, n_batches=3):
        torch.manual_seed(0)
        self.batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(n_batches)]

    def __len__(self):
        return len(self.batches)

    def epoch(self, e):
        return iter(self.batches)


def make_state(max_steps=6, schedule_steps=6):
    model = torch.nn.Linear(3, 2)
    return FitState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    loss_fn=torch.nn.functional.cross_entropy, loader=ListLoader(),
                    schedule_steps=schedule_steps, max_steps=max_steps)


class Recorder:
    def __init__(self, name, log):
        self.name, self.log = name, log
        for event in EVENTS:
            setattr(self, event, lambda state, e=event: self.log.append((self.name, e, state.step)))


def test_events_fire_in_order_and_after_events_reverse():
    log = []
    state = fit(make_state(max_steps=3), [Recorder("a", log), Recorder("b", log)])
    assert state.outcome == "completed" and state.step == 3 and state.epoch == 1 and state.images_seen == 12
    assert log[:4] == [("a", "before_fit", 0), ("b", "before_fit", 0), ("a", "before_epoch", 0),
                       ("b", "before_epoch", 0)]
    assert log[4:6] == [("a", "before_batch", 0), ("b", "before_batch", 0)]
    assert log[6:8] == [("b", "after_loss", 0), ("a", "after_loss", 0)]
    assert log[8:10] == [("b", "after_step", 1), ("a", "after_step", 1)]
    assert log[-2:] == [("b", "after_fit", 3), ("a", "after_fit", 3)]


def test_max_steps_cuts_mid_epoch_and_progress_follows_the_schedule():
    seen = []

    class Watch:
        def after_step(self, state):
            seen.append((state.progress, state.epoch_float))

    state = fit(make_state(max_steps=4, schedule_steps=8), [Watch()])
    assert state.step == 4 and state.epoch == 2
    assert seen[-1] == (0.5, 4 / 3)


def test_the_loop_trains():
    state = make_state(max_steps=30)
    before = [p.clone() for p in state.model.parameters()]
    fit(state, [])
    assert any(not torch.equal(a, b) for a, b in zip(before, state.model.parameters()))


def test_stopfit_and_interrupt_end_with_an_outcome_and_run_after_fit():
    class Stopper:
        def __init__(self, exc):
            self.exc, self.finished = exc, False

        def after_step(self, state):
            if state.step == 2:
                raise self.exc

        def after_fit(self, state):
            self.finished = True

    stop = Stopper(StopFit("reached", "done"))
    state = fit(make_state(), [stop])
    assert (state.outcome, state.detail, state.step, stop.finished) == ("reached", "done", 2, True)
    ctrl_c = Stopper(KeyboardInterrupt())
    state = fit(make_state(), [ctrl_c])
    assert state.outcome == "interrupted" and "step 2" in state.detail and ctrl_c.finished


def test_hooks_may_replace_the_batch_and_the_loss():
    class ZeroLoss:
        def before_batch(self, state):
            state.inputs = state.inputs * 0

        def after_loss(self, state):
            state.loss = state.loss * 0

    state = make_state(max_steps=3)
    weight = state.model.weight.clone()
    fit(state, [ZeroLoss()])
    assert torch.equal(weight, state.model.weight)  # zero loss: no gradient, no change


def test_with_step_images_the_schedule_counts_images_when_batches_vary():
    from speedrun.measure.clock import Clock
    from speedrun.train.hooks import Evaluator

    class VaryingLoader(ListLoader):
        def __init__(self):
            torch.manual_seed(0)
            self.batches = [(torch.randn(b, 3), torch.randint(0, 2, (b,))) for b in (4, 8, 12, 4)]

    model = torch.nn.Linear(3, 2)
    state = FitState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     loss_fn=torch.nn.functional.cross_entropy, loader=VaryingLoader(), schedule_steps=10,
                     max_steps=10, step_images=4)
    seen, evaluated = [], []

    class Watch:
        def after_step(self, state):
            seen.append((state.images_seen, state.progress, state.epoch_float))

    evaluator = Evaluator(None, clock=Clock().start(), target=None, every_steps=3)
    evaluator.run = lambda state: evaluated.append(state.images_seen)
    fit(state, [Watch(), evaluator])
    # images 4, 12, 24, 28 | 32, 40: the schedule of 10 steps of 4 images ends at 40, after 6 optimizer steps
    assert [s[0] for s in seen] == [4, 12, 24, 28, 32, 40] and state.step == 6 and state.epoch == 2
    assert [s[1] for s in seen] == [i / 40 for i in (4, 12, 24, 28, 32, 40)]
    assert seen[-1][2] == 40 / 4 / 4  # epochs of len(loader) schedule steps
    assert evaluated == [12, 24, 40]  # every 3 schedule steps (12 images) crossed, and at the end
