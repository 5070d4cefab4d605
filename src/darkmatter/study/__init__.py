"""A study as a list of steps: ``steps/`` (one module per step), the ``StudyContext`` they run on
(``context``) and the ``Step`` protocol (``step``). ``darkmatter.runner`` runs them; nothing here imports
the runner or the report."""
