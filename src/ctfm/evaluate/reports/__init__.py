"""Reports and figures: ``results.json`` with provenance and the self-contained ``report.html`` (``report``), matplotlib figures (``figures``)."""
