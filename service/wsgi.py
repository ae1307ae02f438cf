"""WSGI entry point for running gunicorn (or any WSGI server) directly:

    gunicorn -c python:service.gunicorn_conf 'service.wsgi:app'

``cmv-cds serve`` does the same without this module. Settings come from the ``CMV_CDS_*`` environment.
"""

from __future__ import annotations

from flask import Flask

from service.app import create_app

app: Flask = create_app()
