/// `IBV_WC_*` statuses the channel treats specially.
enum WorkCompletionStatus {
    static let success: Int32 = 0
    static let remoteAccessError: Int32 = 10  // IBV_WC_REM_ACCESS_ERR
    static let flushed: Int32 = 5             // IBV_WC_WR_FLUSH_ERR
}
