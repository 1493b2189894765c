"""rehead.eval: score a converted model against its original with lm-evaluation-harness."""
