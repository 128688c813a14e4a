"""When assets rebuild on their own (declarative automation; the daemon of `make ui` runs it).

Cheap data assets follow new data at once (`eager`); the trainers, whose runs are long, wait
for the weekly tick and then train if they are missing or if something they read, or their
code or params, changed since they last ran: one after the other down the graph, each once
its parents have finished.
"""

import dagster as dg

WEEKLY = "0 3 * * 0"  # Sunday 03:00 UTC
NIGHTLY = "0 2 * * *"  # 02:00 UTC: the scheduled rebuild of whatever is stale

EAGER = dg.AutomationCondition.eager()

RETRAIN = (
    dg.AutomationCondition.cron_tick_passed(WEEKLY).since_last_handled()
    & (
        dg.AutomationCondition.missing()
        | (
            dg.AutomationCondition.any_deps_updated()
            | dg.AutomationCondition.code_version_changed()
        ).since_last_handled()
    )
    & ~dg.AutomationCondition.any_deps_missing()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label(f"weekly retrain when outdated ({WEEKLY})")
