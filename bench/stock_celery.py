"""Stock Celery over kombu's filesystem transport: the baseline apilog is measured against."""

from __future__ import annotations

import os
import time

from celery import Celery

FOLDER = os.environ["BENCH_CELERY_DIR"]
for sub in ("queue", "processed"):
    os.makedirs(f"{FOLDER}/{sub}", exist_ok=True)

app = Celery("stock_celery", broker="filesystem://")
app.conf.update(
    broker_transport_options={
        "data_folder_in": f"{FOLDER}/queue",
        "data_folder_out": f"{FOLDER}/queue",
        "processed_folder": f"{FOLDER}/processed",
    },
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    # What NOTES.md found a filesystem broker needs: no remote control, no events.
    worker_enable_remote_control=False,
    worker_send_task_events=False,
)


@app.task
def write_line(text: str) -> None:
    with open(f"{FOLDER}/celery.log", "a", encoding="utf-8") as out:
        out.write(f"{time.time()} {text}\n")
