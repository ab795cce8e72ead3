"""The reporter: run records (JSON) in, one self-contained HTML report (plus CSV tables) out.

``reports.build.build_report`` is the entry point (``cl-bench report`` and ``cl-bench run --report``).
``tables`` turns records into pandas tables, ``plots`` draws matplotlib figures as embedded SVG,
``templates/report.html.j2`` lays out the page. The reporter reads JSON only: it never imports
torch, avalanche, open_clip or transformers, so reports build anywhere the records are.
"""
