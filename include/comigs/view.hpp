#pragma once
// Row-major matrix views over raw buffers. Layers take and return these; Eigen maps sit underneath for
// the heavy lifting, so callers never need Eigen types in their own code.
#include <Eigen/Core>
#include <cstddef>
#include <span>
#include <type_traits>

#include "error.hpp"

namespace comigs {

/// Sizes and indices (signed, like Eigen::Index). Spelled `Index` so that `using namespace comigs;`
/// does not collide with POSIX's global `index()` function.
using Index = std::ptrdiff_t;
using index = Index;  ///< older spelling, kept for code inside namespace comigs

/// A rows x cols row-major matrix at `data` whose rows are `stride` elements apart (stride >= cols).
/// `MatrixView<const T>` is the read-only form; a `MatrixView<T>` converts to it.
template <class T>
struct MatrixView {
    T* data = nullptr;
    Index rows = 0;
    Index cols = 0;
    Index stride = 0;

    MatrixView() = default;
    MatrixView(T* d, Index r, Index c) : MatrixView(d, r, c, c) {}
    MatrixView(T* d, Index r, Index c, Index s) : data(d), rows(r), cols(c), stride(s) {
        require<ShapeError>(r >= 0 && c >= 0, "matrix view shape [", r, ", ", c, "]: sizes must be >= 0");
        require<ShapeError>(s >= c, "matrix view stride ", s, ": must be >= cols ", c);
        require(d != nullptr || r * c == 0, "matrix view [", r, ", ", c, "]: null data pointer");
    }
    template <class U>
        requires(std::is_same_v<std::remove_const_t<T>, U> && std::is_const_v<T>)
    MatrixView(const MatrixView<U>& o) : data(o.data), rows(o.rows), cols(o.cols), stride(o.stride) {}

    T& operator()(Index i, Index j) const { return data[i * stride + j]; }
    T* row_ptr(Index i) const { return data + i * stride; }
    std::span<T> row(Index i) const { return {data + i * stride, static_cast<std::size_t>(cols)}; }
    Index size() const { return rows * cols; }
    bool empty() const { return rows == 0 || cols == 0; }
    bool contiguous() const { return stride == cols || rows <= 1; }

    /// Rows [first, first + count).
    MatrixView middle_rows(Index first, Index count) const {
        return MatrixView(data + first * stride, count, cols, stride);
    }
};

template <class T>
using ConstMatrixView = MatrixView<const T>;

template <class T>
using EigenRowMajor = Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Eigen map onto a view (mutable or const according to T).
template <class T>
auto eigen(const MatrixView<T>& v) {
    using Mat = std::conditional_t<std::is_const_v<T>, const EigenRowMajor<T>, EigenRowMajor<T>>;
    return Eigen::Map<Mat, Eigen::Unaligned, Eigen::OuterStride<>>(v.data, v.rows, v.cols,
                                                                  Eigen::OuterStride<>(v.stride));
}

/// Checks a view has the expected shape; `what` names the tensor in the error.
template <class T>
void require_shape(const MatrixView<T>& v, Index rows, Index cols, const char* what) {
    require<ShapeError>(v.rows == rows && v.cols == cols, what, " has shape [", v.rows, ", ", v.cols,
                        "], expected [", rows, ", ", cols, "]");
    require(v.data != nullptr || v.size() == 0, what, ": null buffer");
}

}  // namespace comigs
