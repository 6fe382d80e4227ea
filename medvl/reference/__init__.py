"""Plain-PyTorch references: readable, materialise whatever they like, the oracle for every test.

One module per op, named as the op (``medvl.reference.sigmoid_loss.sigmoid_loss``).
"""
