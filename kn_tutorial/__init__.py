"""kn_tutorial: the package behind the book *Knowledge Neurons in NLP*."""
