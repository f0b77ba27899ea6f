"""The mechanisms, one module per registry id: ``fastattn/mechanisms/<family>/<id>.py``.

Nothing imports this package's modules by hand: :mod:`fastattn.registry` imports
``fastattn.mechanisms.<family>.<id>`` the first time the id is asked for (the family comes from
``catalogue.tsv``), and the module's ``@register`` decorator adds it. A new mechanism is one new file
at that path; shared logic goes in :mod:`fastattn.ops`, never here.
"""
