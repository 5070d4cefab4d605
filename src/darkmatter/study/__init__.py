"""A study as a list of steps: ``steps/`` (one module per step), the ``StudyContext`` they run on
(``context``), the ``Step`` protocol (``step``) and the ``Runner`` that orders, skips, times and summarises
them (``runner``; ``runner.run_study`` is the library form of ``darkmatter run``)."""
