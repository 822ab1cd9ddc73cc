"""the engine's worker side: a trial carries on when no prune decision comes."""

from __future__ import annotations


def test_a_trial_whose_decision_does_not_come_carries_on(monkeypatch):
    """The prune-decision timeout failed the trial (TimeoutError) while the comment said it carries on."""
    from distributed import Client

    import sherl_pipe.engine.worker as worker

    monkeypatch.setattr(worker, "DECISION_TIMEOUT", 0.3)
    spec = {"number": 0, "metric": "accuracy", "reports": "r-test", "decisions": "d-test", "decide": True}
    record = {"epoch": 1, "complete": True, "final": False, "train_loss": 1.0, "eval": {"accuracy": 0.5}}
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0"):
        worker.Reporter(spec)(record)  # no one answers: returns
