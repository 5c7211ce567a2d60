"""The classic "catch-all" asynchronous Flask-RESTful API, ported to flask_restful_async.

Any GET path but those under ``/status`` (the task URLs) starts a slow job: it
answers ``202 Accepted`` at once, with a ``Location`` to poll (``/status/<task_id>``)
and a ``Retry-After``. Polling answers 202 and the task's status document (with its
progress) while the job runs, then ``200 "The answer is: <path>"``. A ``DELETE`` of
the status URL stops the job at its next step (``409``). The job takes 10 s; set
``CATCHALL_SECONDS`` for a quicker demo.

Run it with Flask's development server (http://127.0.0.1:5000)::

    python examples/catchall.py

or with gunicorn, from the repository root::

    gunicorn -w 4 --threads 4 -b 127.0.0.1:8000 examples.catchall:app

then ``python examples/client.py http://127.0.0.1:8000/hello/world``.

In debug mode (run as a script, or with ``FLASK_DEBUG=1``) it also serves the
dashboard, http://127.0.0.1:5000/dashboard: the tasks, live, with their progress.
"""

from __future__ import annotations

import logging
import os
import time

from flask import Flask
from flask_restful import Api

from flask_restful_async import AsyncResource, current_task, register_async

#: How long the "intensive processing" takes (seconds), in STEPS steps.
SECONDS = max(0.0, float(os.environ.get("CATCHALL_SECONDS", "10")))
STEPS = 10

# Tasks are kept in a SQLite file in the instance folder, which every process of this
# machine shares: any number of gunicorn workers will do. Flask would put the instance
# folder beside this file when it runs as a script, and in the current directory under
# gunicorn: name it, so that it is examples/instance/ however the app is started.
INSTANCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "instance")
app = Flask(__name__, instance_path=INSTANCE)
app.logger.setLevel(logging.INFO)  # show the info lines below outside debug mode too
if __name__ == "__main__":
    app.debug = True  # as app.run(debug=True) below; known before register_async reads it
if app.debug:  # python examples/catchall.py, or FLASK_DEBUG=1 (make demo sets it)
    # The dashboard, at /dashboard. This app has no owner callable: debug mode shows
    # every task to whoever opens the page, which is only fit for your own machine.
    app.config["RESTFUL_ASYNC_DASHBOARD"] = "/dashboard"
api = Api(app)
register_async(api, url="/status/<task_id>")


class CatchAll(AsyncResource):
    def get(self, path: str = "") -> str:
        # perform some intensive processing
        app.logger.info("starting processing task, path: '%s'", path)
        for step in range(1, STEPS + 1):
            time.sleep(SECONDS / STEPS)
            current_task.raise_if_cancelled()  # a DELETE of the status URL: stop here (409)
            current_task.progress(step, total=STEPS, message=f"step {step} of {STEPS}")
        app.logger.info("completed processing task, path: '%s'", path)
        return f"The answer is: {path}"


api.add_resource(CatchAll, "/<path:path>", "/")

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=5000, debug=True)
