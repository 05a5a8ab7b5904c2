"""The `embedstore` command line: main.py assembles the app and turns errors into one line and an exit
code; one module per command group (ingest, search, evaluate, finetune, bench, manage, serve, demo);
the options several commands share are declared once (options.py), tables and bars in render.py and
progress.py. Thin: what a Python user would also need lives in the library."""
