"""Rollouts for online RL: sampling from the training model and scoring with reward functions."""
