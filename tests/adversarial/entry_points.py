"""The adversarial suite's table: every public entry point -> its hostile-input tests.

`ADVERSARIAL_CASES` maps each public entry point of ntkit to the tests that feed it
hostile input (shapes, dtypes, values, files, stores, concurrency, parser limits,
command-line paths), as ``"<file>::<test function>"`` under tests/adversarial/, or
to an `Exempt` with the reason it needs none of its own. tests/adversarial/
test_coverage.py fails when a public entry point is missing here, when an entry
here is no longer public, when a named test does not exist, and when a file of
the suite is named by no entry: a new public function, class or command joins the
suite by getting a row.

Entry points, by name:
- ``ntkit.<name>``: every callable in ``ntkit.__all__``;
- ``ntkit.predict.<name>``, ``ntkit.solvers.<name>``, ``ntkit.spec.<name>``,
  ``ntkit.sklearn.<name>``: every callable in those modules' ``__all__``;
- ``ntkit <command>``: every command of the ``ntkit`` command line.

A `Pending` row names the file whose tests are still being written (issue 14's
areas land in parallel); the coverage test then checks membership only. Replace
it with test ids once they exist.

The files, by area of issue 14: test_stores.py (kernel stores), test_outputs.py
(finite outputs and predictions), test_parser.py (spec parser and model files),
test_numerics.py (numerics and conversion), test_cli_paths.py (the command line).
"""

from __future__ import annotations

from dataclasses import dataclass

#: The suite's files, one per area of issue 14.
SUITE_FILES = ("test_stores.py", "test_outputs.py", "test_parser.py", "test_numerics.py",
               "test_cli_paths.py")


@dataclass(frozen=True)
class Exempt:
    """An entry point with no hostile-input test of its own, and why (which other
    tests reach it, or why it takes no input to be hostile with)."""

    reason: str


@dataclass(frozen=True)
class Pending:
    """An entry point whose tests are being written in ``file`` (membership only)."""

    file: str


_LAYER = Exempt(
    "a layer constructor: its hyperparameters are checked where it is built, and the "
    "contract battery (tests/layers/test_contract.py) runs every public layer, failing "
    "for one left out; hostile inputs reach it through net.kernel (test_numerics.py)")
_ERROR = Exempt("an exception type of ntkit.errors: raised, never called with user input; "
                "test_cli_paths.py::test_every_library_error_is_one_line maps each to one "
                "line of the command line")
_RESULT = Exempt("a result value returned by a checked computation (its fields are the "
                 "checked outputs); users read it, they do not feed it input")

_LAYERS = (
    "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "Aggregate",
    "RNN",
    "ExpNormalized", "Gabor", "Hermite", "Polynomial", "SigmoidLike",
    "ABReLU", "Abs", "Activation", "AvgPool1d", "AvgPool2d", "AvgPool3d", "Conv1d", "Conv2d",
    "Conv3d", "Cos", "Dropout", "Elementwise", "Erf", "Exp", "FanInConcat", "FanInProd",
    "FanInSum", "FanOut", "Flatten", "GELU", "Gaussian", "GlobalAvgPool", "GlobalSumPool",
    "Identity", "Layer", "LayerNorm", "LeakyReLU", "Linear", "LocallyConnected1d",
    "LocallyConnected2d", "LocallyConnected3d", "Monomial", "Parallel", "Rbf",
    "ReLU", "RectifiedMonomial", "Repeat", "SelfAttention", "Sequential", "Sigmoid", "Sign",
    "Sin", "Softplus", "SumPool1d", "SumPool2d", "SumPool3d", "Tanh",
)

_CLI = "test_cli_paths.py::"
_STORES = "test_stores.py::"
_PARSER = "test_parser.py::"
_NUMERICS = "test_numerics.py::"
_OUTPUTS = "test_outputs.py::"
_DIAG_REG = _OUTPUTS + "test_negative_or_non_finite_diag_reg_is_refused_everywhere"
_ASYMMETRIC = _OUTPUTS + "test_non_symmetric_train_kernel_is_refused"
_SOLVER_RESULTS = _OUTPUTS + "test_solver_results_are_checked"

#: entry point -> hostile-input test ids, an `Exempt` or a `Pending`.
ADVERSARIAL_CASES: dict[str, tuple[str, ...] | Exempt | Pending] = {
    **{f"ntkit.{name}": _LAYER for name in _LAYERS},
    # layers with hostile-input tests of their own (area N); net.kernel's inputs
    "ntkit.Sequential": (_NUMERICS + "test_a_single_number_is_not_a_batch",
                         _NUMERICS + "test_mixed_float_dtypes_name_both_and_the_fix",
                         _OUTPUTS + "test_overflowing_inputs_raise_naming_rescale_and_float64",
                         _OUTPUTS + "test_variance_blowing_up_with_depth_names_the_depth_"
                                    "cause"),
    "ntkit.Exp": (_OUTPUTS + "test_stacked_exp_names_exp",),
    "ntkit.Linear": (_NUMERICS + "test_numpy_numbers_are_accepted_as_std",
                     _NUMERICS + "test_refused_std_says_why_without_contradiction",
                     _NUMERICS + "test_numpy_integers_are_accepted_as_widths_and_degrees"),
    "ntkit.Elementwise": (_NUMERICS + "test_erf_quadrature_matches_closed_form",
                          _NUMERICS + "test_erf_quadrature_warns_past_the_cap_with_its_"
                                      "estimated_error",
                          _NUMERICS + "test_rule_and_degree_are_validated"),
    "ntkit.Tanh": (_NUMERICS + "test_quadrature_kernels_are_symmetric_for_inputs_of_"
                               "different_norms",),
    "ntkit.ConversionError": _ERROR,
    "ntkit.Kernel": _RESULT,
    "ntkit.EdgeList": Exempt("a graph value (edge lists for Aggregate): its constructor's "
                             "hostile inputs (float or out-of-range nodes, shapes, weights) "
                             "are tests/test_graph.py::test_per_example_errors_say_what_to_do"),
    "ntkit.TorchRNN": Exempt("a torch module wrapping nn.RNN for from_torch: its bad "
                             "arguments and inputs are tests/test_recurrent.py::"
                             "test_torch_rnn_wrapper_refuses_bad_input"),
    "ntkit.GRU": Exempt("a gated layer without a kernel rule: its hostile arguments and "
                        "inputs (shapes, NaN, lengths, scales) are tests/test_gated.py::"
                        "test_bad_arguments_say_what_was_wrong"),
    "ntkit.LSTM": Exempt("a gated layer like ntkit.GRU, tested the same way in tests/test_gated.py::"
                         "test_bad_arguments_say_what_was_wrong"),
    "ntkit.Embedding": Exempt("a layer whose hostile inputs (float, out-of-range or "
                              "misshapen token ids, ids given to a network without an "
                              "Embedding first) are tests/test_embedding.py::"
                              "test_token_id_errors_say_what_to_do"),
    "ntkit.MultiheadAttention": Exempt("a layer whose hostile arguments (widths, heads not "
                                       "dividing, sample counts, scales, generator) are "
                                       "tests/test_transformer.py::"
                                       "test_bad_arguments_say_what_to_do"),
    "ntkit.TokenReadout": _LAYER,
    "ntkit.encoder_block": Exempt("builds a Sequential of checked layers; its own bad "
                                  "arguments are tests/test_transformer.py::"
                                  "test_bad_arguments_say_what_to_do"),
    "ntkit.numerical_error": Exempt("runs net.kernel (whose hostile inputs are tested) on "
                                    "copies; its own bad arguments are tests/"
                                    "test_transformer.py::test_bad_arguments_say_what_to_do"),
    "ntkit.TileDone": _RESULT,
    "ntkit.TaylorModel": Exempt("returned by ntkit.taylor, whose hostile inputs are "
                                "test_numerics.py's; not constructed by users"),
    # kernel stores (area S)
    "ntkit.kernel_matrix": (
        _STORES + "test_users_zarr_group_is_never_deleted",
        _STORES + "test_networks_differing_in_content_are_not_resumed",
        _STORES + "test_second_writer_in_this_process_is_refused",
        _STORES + "test_damaged_chunk_is_recomputed_on_resume",
        _STORES + "test_non_finite_tile_is_never_stored",
    ),
    "ntkit.write_kernel_matrix": (_STORES + "test_write_kernel_matrix_keeps_the_guarantees",),
    "ntkit.parse_memory": (_CLI + "test_hostile_memory_budget_is_a_usage_error",),
    # numerics and conversion (area N)
    "ntkit.from_torch": (
        _NUMERICS + "test_custom_autograd_function_is_refused_by_name",
        _NUMERICS + "test_subclass_of_a_layer_without_kernel_rule_names_the_base",
        _NUMERICS + "test_subclass_overriding_forward_is_refused_by_name",
    ),
    "ntkit.linearize": (_NUMERICS + "test_linearized_model_without_double_backward_trains",),
    "ntkit.taylor": (_NUMERICS + "test_taylor_degree_is_validated",
                     _NUMERICS + "test_taylor_of_a_model_without_trainable_parameters_says_so"),
    # finite outputs (area F)
    "ntkit.empirical_kernels": (_OUTPUTS + "test_monte_carlo_refuses_non_finite_inputs_and_"
                                           "outputs",),
    "ntkit.empirical_nngp": (_OUTPUTS + "test_empirical_refuses_non_finite_x2_alone_and_one_"
                                        "example_batches",
                             _OUTPUTS + "test_empirical_overflow_is_a_non_finite_error",
                             _OUTPUTS + "test_empirical_mixed_dtypes_are_named"),
    "ntkit.empirical_ntk": (_OUTPUTS + "test_empirical_refuses_non_finite_x2_alone_and_one_"
                                       "example_batches",
                            _OUTPUTS + "test_empirical_overflow_is_a_non_finite_error",
                            _OUTPUTS + "test_empirical_mixed_dtypes_are_named"),
    "ntkit.empirical_ntk_by_layer": (_OUTPUTS + "test_empirical_overflow_is_a_non_finite_"
                                                "error",),
    "ntkit.finite_width": Exempt(
        "1/width corrections of an MLP: its input checks (non-MLP networks, widths, input "
        "shapes) are tested in tests/test_finite_width.py::test_bad_inputs"),
    "ntkit.nngp_four_point": Exempt(
        "the four-point vertex of finite_width's recursion: index shape and range checks "
        "are tested in tests/test_finite_width.py::test_bad_inputs"),
    "ntkit.monte_carlo_kernel": (_OUTPUTS + "test_monte_carlo_refuses_non_finite_inputs_and_"
                                            "outputs",),
    "ntkit.predict.gp_inference": (
        _ASYMMETRIC, _DIAG_REG,
        _OUTPUTS + "test_non_finite_kernels_and_targets_are_refused_by_name",
        _OUTPUTS + "test_wrong_shapes_and_dtypes_name_the_argument_and_the_expected_shape",
        _OUTPUTS + "test_overflowing_prediction_is_a_non_finite_error",
    ),
    "ntkit.predict.gradient_descent": (
        _ASYMMETRIC, _OUTPUTS + "test_non_finite_initial_outputs_are_refused_by_name",
        _OUTPUTS + "test_wrong_shapes_and_dtypes_name_the_argument_and_the_expected_shape",
    ),
    "ntkit.predict.gradient_descent_mse": (
        _ASYMMETRIC, _DIAG_REG,
        _OUTPUTS + "test_non_finite_kernels_and_targets_are_refused_by_name",
        _OUTPUTS + "test_non_finite_initial_outputs_are_refused_by_name",
        _OUTPUTS + "test_overflowing_prediction_is_a_non_finite_error",
    ),
    "ntkit.predict.gradient_descent_mse_ensemble": (
        _DIAG_REG, _OUTPUTS + "test_auto_solver_warns_when_it_switches_to_nystrom"),
    "ntkit.predict.max_learning_rate": (_ASYMMETRIC,),
    **{f"ntkit.predict.{name}": _RESULT for name in (
        "EnsemblePrediction", "GPPosterior", "Trajectory")},
    **{f"ntkit.predict.{name}": Exempt(
        "a predictor returned by its ntkit.predict function (factor once, evaluate many); "
        "that function's hostile inputs are test_outputs.py's") for name in (
        "EnsemblePredictor", "MSEPredictor", "ODEPredictor")},
    "ntkit.solvers.cg_krr": (_ASYMMETRIC,),
    "ntkit.solvers.conjugate_gradient": (_SOLVER_RESULTS,),
    "ntkit.solvers.diag_reg_absolute": (_DIAG_REG,),
    "ntkit.solvers.exact_krr": (_DIAG_REG, _SOLVER_RESULTS),
    "ntkit.solvers.kernel_function": (_SOLVER_RESULTS,),
    "ntkit.solvers.nystrom_krr": (_DIAG_REG,),
    "ntkit.solvers.resolve_solver": (_OUTPUTS + "test_auto_solver_warns_when_it_switches_to_"
                                                "nystrom",),
    "ntkit.solvers.solve_krr": (_DIAG_REG,),
    "ntkit.solvers.CGInfo": _RESULT,
    "ntkit.solvers.ConvergenceError": _ERROR,
    "ntkit.solvers.ConvergenceWarning": Exempt(
        "a warning type of ntkit.errors, issued by the solvers (on_failure='warn'), never "
        "called with user input"),
    "ntkit.solvers.NotPositiveDefiniteError": _ERROR,
    "ntkit.solvers.KernelFunction": Exempt(
        "the protocol of a kernel function (a type for annotations); its one adapter, "
        "ntkit.solvers.kernel_function, has the hostile-input tests"),
    "ntkit.solvers.NetworkKernel": Exempt(
        "made by ntkit.solvers.kernel_function from a network; tested through it"),
    "ntkit.solvers.KernelRidgePredictor": Exempt(
        "returned by the ntkit.solvers *_krr functions; tested through them"),
    "ntkit.solvers.Checkpoint": Exempt(
        "a checkpoint directory for nystrom_krr: its hostile inputs (foreign folders, files, "
        "damaged arrays, other data or settings, a second writer, bad every/key, SIGKILL "
        "mid-fit) are tested in tests/test_fit_checkpoint.py"),
    "ntkit.solvers.CheckpointError": _ERROR,
    "ntkit.solvers.auto_centers": Exempt(
        "a rule on two numbers (N and a memory budget, parsed by parse_memory); its values "
        "are tested in tests/test_falkon_uncached.py::test_auto_centers_rule"),
    # spec parser and model files (area P)
    "ntkit.spec.parse_architecture": (
        _PARSER + "test_truncated_spec_is_a_spec_error_with_position_and_caret",
        _PARSER + "test_5000_nested_parentheses_are_refused_not_recursion",
        _PARSER + "test_repeat_bomb_is_refused_before_expansion",
        _PARSER + "test_yaml_alias_bomb_and_deep_yaml_are_refused",
    ),
    "ntkit.spec.load_json": (
        _PARSER + "test_deep_json_and_python_lists_are_refused_not_recursion",
        _PARSER + "test_json_repeat_bomb_and_truncated_json",
    ),
    "ntkit.spec.SpecLimits": (_PARSER + "test_limits_are_checked",),
    "ntkit.spec.SpecError": _ERROR,
    "ntkit.spec.to_spec": Exempt(
        "writes the spec of a network ntkit built (no user text to parse); what it writes "
        "is read back by parse_architecture under the parser's limits "
        "(test_parser.py::test_model_file_round_trip_is_unchanged)"),
    "ntkit.sklearn.load": (
        _PARSER + "test_truncated_model_file_is_a_model_file_error",
        _PARSER + "test_crafted_meta_is_refused_by_name",
        _PARSER + "test_crafted_arrays_are_refused",
        _PARSER + "test_load_limits_apply_to_the_stored_spec",
    ),
    "ntkit.sklearn.save": (_PARSER + "test_save_refuses_nan_and_keeps_the_previous_file",),
    **{f"ntkit.sklearn.{name}": (
        _OUTPUTS + "test_estimators_auto_nystrom_warns_and_identical_fits_are_identical",
        _OUTPUTS + "test_estimators_refuse_nan_fitted_coefficients",
    ) for name in ("NNGPRegressor", "NTKClassifier", "NTKRegressor")},
    **{f"ntkit.sklearn.{name}": (_OUTPUTS + "test_sklearn_kernels_refuse_nan_and_overflow",)
       for name in ("NNGPKernel", "NTKKernel")},
    "ntkit.sklearn.NeuralTangentKernel": Exempt(
        "a closed-form NumPy kernel; its hostile inputs (NaN and infinite inputs, overflow, "
        "wrong shapes, bad depth or bias, a gradient with Z) are tested in "
        "tests/test_scikit_ntk.py::test_bad_input_is_refused_with_a_clear_error"),
    "ntkit.sklearn.NTKRandomFeatures": Exempt(
        "a transformer over ntkit.features.RandomFeatureMap: scikit-learn's check_estimator "
        "(NaN, infinite, empty and mis-shaped X) and the map's hostile inputs are tested in "
        "tests/test_random_features.py"),
    # the command line (area C)
    "ntkit kernel": (
        _CLI + "test_kernel_output_that_is_its_data_is_refused",
        _CLI + "test_kernel_output_that_is_another_input_is_refused",
        _CLI + "test_store_that_holds_an_input_is_refused",
        _CLI + "test_existing_output_needs_force",
        _CLI + "test_interrupted_write_leaves_the_old_file",
        _CLI + "test_overflowing_kernel_is_not_written",
        _CLI + "test_nan_kernel_is_not_written",
        _CLI + "test_values_that_overflow_float32_are_named",
        _CLI + "test_every_library_error_is_one_line",
    ),
    "ntkit fit": (
        _CLI + "test_fit_output_that_is_its_training_data_is_refused",
        _CLI + "test_values_that_overflow_float32_are_named",
    ),
    "ntkit predict": (
        _CLI + "test_predict_output_that_is_the_model_or_the_data_is_refused",
        _CLI + "test_model_with_nan_coefficients_predicts_nothing",
    ),
    "ntkit bench": (_CLI + "test_bench_unknown_case_is_one_line",),
    "ntkit demo": (_CLI + "test_demo_refuses_a_file_as_its_folder",),
    "ntkit regimes": Exempt(
        "its hostile inputs (non-numeric widths, --train past the data, a figure suffix that "
        "is not an image, an existing output without --force) are tested in "
        "tests/test_parameterization.py::test_regimes_command_bad_input; outputs go through "
        "the shared check_outputs and write_atomically"),
    "ntkit curve": Exempt(
        "its hostile inputs (an output that is the data, an existing output without --force, "
        "sizes past the pool, non-numeric sizes, a negative ridge) are tested in "
        "tests/test_cli_curve.py; outputs go through the shared check_outputs and "
        "write_atomically"),
}
