"""Stage-selection policies pick the stage the docstring promises (outputs are tested elsewhere:
every policy must give the same tokens; here, the order of work)."""
from recursa.engine.policy import DepthwisePolicy, FullestPolicy, SynchronousPolicy, make_policy


class _Seq:
    def __init__(self, depth, n=1, generated=0):
        self.depth, self.chunk_len, self.in_flight = depth, n, True
        self.num_prompt_tokens, self.num_tokens = 5, 5 + generated


# a middle-cycle model: depth 0 prelude (stage 0), shared stages 1, 2 looped 3 times, coda stage 3
KEYS = [0, 1, 2, 1, 2, 1, 2, 3]


def test_depthwise_sweeps_depths_in_order_and_skips_empty_stages():
    policy = make_policy("depthwise", KEYS, token_budget=100)
    groups = {0: [_Seq(0)], 1: [_Seq(1), _Seq(5)], 3: [_Seq(7)]}
    assert [policy.pick(groups) for _ in range(5)] == [0, 1, 1, 1, 3]   # depths 0, 1, 3, 5, 7 (stage 2 empty)


def test_depthwise_runs_full_stages_first_when_the_budget_binds():
    policy = DepthwisePolicy(KEYS, token_budget=4)
    groups = {0: [_Seq(0)], 2: [_Seq(2, 2), _Seq(4, 2)], 3: [_Seq(7)]}
    assert policy.pick(groups) == 2                      # the only stage with a full run waiting
    groups = {0: [_Seq(0, 3)], 1: [_Seq(1)], 3: [_Seq(7)]}
    assert policy.pick(groups) == 0                      # 5 waiting >= budget, none full: the fullest


def test_fullest_and_synchronous():
    groups = {0: [_Seq(0)], 1: [_Seq(1), _Seq(3)], 3: [_Seq(7)]}
    assert FullestPolicy().pick(groups) == 1
    assert SynchronousPolicy().pick(groups) == 0
    assert not SynchronousPolicy().admit([_Seq(3)]) and FullestPolicy().admit([_Seq(3)])


def test_depthwise_fills_a_run_with_the_requests_that_generated_least():
    a, b, c, d, e = (_Seq(1, generated=9), _Seq(1, generated=7), _Seq(3, generated=2), _Seq(1, generated=7),
                     _Seq(5, generated=0))
    # the earliest admitted first (it never starves), then the least advanced; ties keep admission order
    assert DepthwisePolicy(KEYS, token_budget=4).run_order([a, b, c, d, e]) == [a, e, c, b, d]
    assert FullestPolicy().run_order([a, b, c, d, e]) == [a, b, c, d, e]
