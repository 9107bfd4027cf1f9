"""``alignkit label``: a local web app where people rank and score K responses per prompt.

    tasks.py    read and validate ``{prompt, responses}`` rows (what ``alignkit generate`` writes)
    store.py    the one data layer (SQLAlchemy Core): SQLite file (WAL) or a PostgreSQL URL
    forms.py    a submitted form -> ranks + rubric in the responses' original order (pure)
    app.py      the Starlette app: pages, access token, cross-site checks, security headers
    export.py   labels -> K-wise rows that ``alignkit rm`` reads (written atomically)
    stats.py    per-labeler counts, pairwise agreement and Kendall's tau-b between labelers
    cli.py      ``serve``, ``export``, ``stats``
"""
