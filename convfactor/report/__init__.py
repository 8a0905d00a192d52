"""convfactor.report"""
