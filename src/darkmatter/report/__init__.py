"""The report: figures drawn from results (``drawings``), HTML sections (``sections``, ``html``), and
``build.write_report``, which ties them together from the result files alone."""
