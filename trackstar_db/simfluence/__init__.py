"""Simfluence (Guu et al. 2023): simulate a training run's effect on the loss of probe queries.

Instead of one score per training example, Simfluence-Linear learns per probe query q and per
training example i a multiplicative and an additive effect, and predicts q's loss after every
step of any curriculum (a sequence of batches c_1, c_2, ...):

    L_t = alpha(c_t) L_{t-1} + beta(c_t),   alpha(c) = 1 + sum_{i in c} a_i,  beta(c) = sum_{i in c} b_i

(the paper's alpha_i is a_i + 1/|c|, written so that the ridge penalty pulls towards "no change",
not towards a loss of zero). The additive special case (a = 0) is what TracIn amounts to as a
simulator.

- record.py: N short runs of the testbed model on random subsets and orders of the corpus,
  recorded as Lance tables sim_runs, sim_steps, sim_batches, sim_trajectories (schema/sim_*.json);
- data.py: the recorded runs back as arrays (batches as example indices, loss trajectories);
- fit.py: ridge least squares per probe, in the primal or the dual (kernel) form, whichever is
  smaller, from one sparse batch-membership matrix shared by every probe;
- simulate.py: roll a fitted simulator over a curriculum (a JSON-lines file of batches);
- evaluate.py: held-out runs: all-steps MSE and Spearman of final losses, linear vs additive
  (TracIn-like) vs constant loss.
"""
