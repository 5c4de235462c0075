"""A stock Celery app over kombu's own filesystem transport with apilog's task registered.

Used by test_celery_compat.py: a plain `celery worker` must run the messages apilog's lean
`delay()` path writes.
"""

from __future__ import annotations

import os

from celery import Celery

import apilog

FOLDER = os.environ["COMPAT_BROKER_DIR"]

app = Celery("stock_worker_app", broker="filesystem://")
app.conf.update(
    broker_transport_options={"data_folder_in": FOLDER, "data_folder_out": FOLDER, "processed_folder": f"{FOLDER}/done"},
    accept_content=["json"],
    worker_enable_remote_control=False,
    worker_send_task_events=False,
)
apilog.register(app)
