"""The trainer's parts: kimi/train.py reads top-down and calls these.

validator.py    one evaluate() and one perplexity rule; the Validator decides when to run it
stats.py        what a step reads off the model: the router-bias update (an optimizer pre-step hook),
                QK-clip / max-logit stats, all-to-all traffic, and forgetting a skipped step's statistics
console.py      the per-step log line, the eta, throughput and MFU; StepLogger decides when to log
nonfinite.py    the NaN/inf policy (train.nonfinite=stop|skip)
preemption.py   SIGTERM / SIGUSR1 -> save and exit after the current step
"""
