"""The handle's verbs beyond api.py, one job per module, each a mixin `Database` (api.py) inherits:

    model.py       attach (a checkpoint), train (the testbed model on the examples)
    exchange.py    export_run, import_run (the authors' viewer format)
    reporting.py   write_report (the static HTML report)
    scale.py       build_index (an ANN index), plan (bytes, RAM and time; also without a database)
    simfluence.py  simfluence_record, simfluence_fit, simulate, simfluence_evaluate

Each verb is one call into the stage that does the work; the CLI command of the same job is that
verb plus formatting (tests/test_front_door.py holds the list). The layer sits between the handle
and the stages: it imports the stages, never api.py, and no stage imports it.
"""
