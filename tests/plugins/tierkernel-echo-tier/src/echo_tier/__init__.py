"""A toy tierkernel tier from another distribution: ``%%tier echo`` runs the cell with
``exec()`` in a namespace of the tier's own, and can shout and repeat what it prints."""
