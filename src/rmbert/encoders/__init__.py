"""News encoders (BERT wrapper, Bi-LSTM) and the news store."""
