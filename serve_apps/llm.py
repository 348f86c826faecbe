"""Ray Serve recipe for the OpenAI-compatible LLM app (the deployment itself lives in ``raystack.serving``).

    serve run serve_apps/llm.yaml                      # the config file (import_path raystack.serving:build_app)
    serve run serve_apps.llm:app model=PATH            # the same builder, args on the command line
    python jobs/deploy.py --model PATH                 # as a job, locally or under ray job submit
"""

from raystack.serving import build_app

app = build_app
