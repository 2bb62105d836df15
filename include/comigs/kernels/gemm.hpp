#pragma once
// Matrix products over row-major views. Every GEMM of the layers goes through here, so that the
// backend (Eigen today) can be swapped or specialised (bf16 frozen weights) in one place.
#include "../view.hpp"

namespace comigs::kernels {

/// Whether an operand enters the product as is or transposed.
enum class Op { none, trans };

/// C = alpha * op(A) * op(B) + beta * C, with beta either 0 (overwrite) or 1 (accumulate).
/// Shapes: op(A) [M, K], op(B) [K, N], C [M, N]. Checked; a mismatch is a ShapeError.
template <class T>
void gemm(MatrixView<T> C, ConstMatrixView<T> A, Op opa, ConstMatrixView<T> B, Op opb, T alpha = T(1),
          T beta = T(0)) {
    const Index m = opa == Op::none ? A.rows : A.cols;
    const Index ka = opa == Op::none ? A.cols : A.rows;
    const Index kb = opb == Op::none ? B.rows : B.cols;
    const Index n = opb == Op::none ? B.cols : B.rows;
    require<ShapeError>(ka == kb && C.rows == m && C.cols == n, "gemm: op(A) [", m, ", ", ka, "] x op(B) [", kb,
                        ", ", n, "] -> C [", C.rows, ", ", C.cols, "] do not agree");
    require(beta == T(0) || beta == T(1), "gemm beta ", beta, ": only 0 or 1 supported");
    if (m == 0 || n == 0) return;
    auto c = eigen(C);
    if (ka == 0) {
        if (beta == T(0)) c.setZero();
        return;
    }
    auto a = eigen(A);
    auto b = eigen(B);
    // Four static cases so that Eigen sees the transposes at compile time.
    auto run = [&](const auto& lhs, const auto& rhs) {
        if (beta == T(0))
            c.noalias() = alpha * (lhs * rhs);
        else
            c.noalias() += alpha * (lhs * rhs);
    };
    if (opa == Op::none && opb == Op::none) run(a, b);
    else if (opa == Op::none) run(a, b.transpose());
    else if (opb == Op::none) run(a.transpose(), b);
    else run(a.transpose(), b.transpose());
}

}  // namespace comigs::kernels
